"""The official Runware SDKs against a live test-target server: one scenario table, one adapter per SDK.

Every scenario below runs through every SDK and transport that can express it, through its public
API only, driven by the client programs in ``tests/e2e/clients/`` and ``tests/e2e/js/``:

* PyPI ``runware`` 0.5.24 over WebSocket,
* PyPI ``runware-sdk`` 1.8.0 over WebSocket and over REST,
* npm ``@runware/sdk-js`` 1.3.2 (``RunwareServer``, Node) over WebSocket.

How each SDK spells a scenario, what it hands back (class names, error shapes, the raw server code or
a category, the HTTP status), whether it polls async tasks itself, and what a wrong key looks like,
is written down in its adapter (``tests/e2e/clients/adapters.py``). One client process per adapter
runs the whole plan (starting an SDK and connecting is the slow part); a second one tries a wrong
key. The tests then check each step of the report and the images behind it (downloaded from
``imageURL`` or decoded), so "it worked" means the exact factor size, the asked format, and a
picture that still looks like the input.

The server runs the resize engine (test-target mode): the SDKs cannot tell, and nothing here is
about how the pixels look beyond "the same picture".
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.clients.adapters import ADAPTERS, Adapter, AsyncFlow, Extra
from tests.e2e.clients.harness import (
    FAST_MODEL,
    UNKNOWN_UUID,
    UPSCALE_CASES,
    SourceImage,
    UpscaleCase,
    check_uploaded,
    check_upscaled,
    make_source,
    run_client,
    single,
    source_value,
    step_error,
    step_result,
)
from upscale_server.testing import UpscaleTestServer

UPLOADED = "${upload.imageUUID}"
FAST = {"model": FAST_MODEL, "upscaleFactor": 2}


# --------------------------------------------------------------------------- the scenario table


@dataclass(frozen=True)
class ErrorCase:
    """A request the server refuses: what the request changes, and what the server answers.

    ``image`` None upscales the uploaded image. ``parameter`` is the field the server names (as the
    SDK sent it: the adapter knows if that is ``inputs.image``); ``named`` is what the message must name.
    """

    name: str
    fields: dict[str, Any]
    image: str | None
    server_code: str
    parameter: str
    named: str
    http_status: int


ERROR_CASES = [
    ErrorCase("factor-7", {"upscaleFactor": 7}, None, "invalidUpscaleFactor", "upscaleFactor", "upscaleFactor", 400),
    ErrorCase(
        "unknown-model",
        {"model": "local:no-such-model@1"},
        None,
        "invalidModel",
        "model",
        "local:no-such-model@1",
        400,
    ),
    ErrorCase("unknown-image", {}, UNKNOWN_UUID, "imageNotFound", "inputImage", UNKNOWN_UUID, 404),
]

#: Async where the SDK polls itself (then getResponse by hand): the request fields.
OWN_ASYNC = {**FAST, "outputType": "dataURI", "outputFormat": "WEBP", "includeCost": True}


@dataclass(frozen=True)
class AckCase:
    """Async answered by the ACK, then the user's getResponse: how the result is asked for."""

    name: str
    output_format: str
    include_cost: bool

    def fields(self) -> dict[str, Any]:
        return {
            **FAST,
            "outputType": "base64Data",
            "outputFormat": self.output_format,
            "includeCost": self.include_cost,
        }


ACK_CASES = [AckCase("async-ack-webp", "WEBP", include_cost=True), AckCase("async-ack-png", "PNG", include_cost=False)]
#: No deliveryMethod (and the default output): whatever the SDK does by default must end with the image.
DEFAULT_DELIVERY = FAST


def by(predicate: Callable[[Adapter], bool]) -> list[Any]:
    return [pytest.param(adapter, id=adapter.id) for adapter in ADAPTERS if predicate(adapter)]


ALL = by(lambda adapter: True)


# --------------------------------------------------------------------------- running the plans


@dataclass(frozen=True)
class Run:
    """One adapter's client run: its report and the async flows its plan contained."""

    adapter: Adapter
    report: dict[str, Any]
    own_async: AsyncFlow | None
    ack_async: dict[str, AsyncFlow]  # by AckCase name
    extras: list[Extra]


def plan(adapter: Adapter, server: UpscaleTestServer, source: SourceImage) -> Run:
    """Every scenario of the table this adapter can express, as one plan; run it."""
    steps = [adapter.upload_step(source)]
    for case in UPSCALE_CASES:
        steps.append(
            adapter.upscale_step(
                case.name,
                {**case.options(), "deliveryMethod": "sync"},
                source_value(source, case.source),
                inputs_form=case.inputs_form,
            )
        )
    steps.append(adapter.upscale_step("default-delivery", DEFAULT_DELIVERY, UPLOADED))
    own = adapter.own_async_flow("async", OWN_ASYNC, UPLOADED) if adapter.polls_async_itself else None
    steps += own.steps if own else []
    acks = {}
    if adapter.returns_async_ack:
        acks = {case.name: adapter.ack_async_flow(case.name, case.fields(), UPLOADED, server) for case in ACK_CASES}
    for flow in acks.values():
        steps += flow.steps
    extras = adapter.extras(source)
    for extra in extras:
        steps += extra.steps
    for error in ERROR_CASES:
        fields = {**FAST, "deliveryMethod": "sync", **error.fields}
        steps.append(adapter.upscale_step(error.name, fields, error.image or UPLOADED))
    report = run_client(adapter.command(server, server.api_key), {"steps": steps})
    return Run(adapter, report, own, acks, extras)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SourceImage:
    return make_source(tmp_path_factory.mktemp("sdks"))


@pytest.fixture(scope="module")
def runs(live_server: UpscaleTestServer, source: SourceImage) -> Iterator[Callable[[Adapter], Run]]:
    """``runs(adapter)``: that adapter's client run, made once per module on first use (a failure too)."""
    done: dict[str, Run | BaseException] = {}

    def get(adapter: Adapter) -> Run:
        if adapter.id not in done:
            try:
                done[adapter.id] = plan(adapter, live_server, source)
            except BaseException as exc:  # pytest.fail included: every test of this adapter reports it
                done[adapter.id] = exc
        outcome = done[adapter.id]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    yield get


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("adapter", ALL)
def test_connects_and_disconnects(runs: Callable[[Adapter], Run], adapter: Adapter) -> None:
    report = runs(adapter).report
    assert (report["sdk"], report["version"]) == (adapter.sdk, adapter.version)
    assert report["connect"]["ok"], report["connect"]
    assert report["disconnect"]["ok"], report["disconnect"]


@pytest.mark.parametrize("adapter", ALL)
def test_upload(
    runs: Callable[[Adapter], Run], adapter: Adapter, live_server: UpscaleTestServer, source: SourceImage
) -> None:
    """The upload answer: a UUID, and an imageURL that serves the same picture."""
    item = adapter.uploaded(runs(adapter).report)
    adapter.check_upload_item(item)
    check_uploaded(item, server=live_server, source=source)


@pytest.mark.parametrize("case", UPSCALE_CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("adapter", ALL)
def test_sync_upscale(
    runs: Callable[[Adapter], Run],
    adapter: Adapter,
    case: UpscaleCase,
    live_server: UpscaleTestServer,
    source: SourceImage,
) -> None:
    """Each input form, outputType and outputFormat, and the default model, through a sync upscale."""
    report = runs(adapter).report
    item = single(step_result(report, case.name))
    adapter.check_result_item(item)
    check_upscaled(
        item,
        server=live_server,
        source=source,
        factor=case.factor,
        output_type=case.expected_type,
        output_format=case.expected_format,
        task_type=adapter.task_type,
        cost=case.include_cost,
    )
    if case.source == "uuid":
        assert item["inputImageUUID"] == adapter.uploaded(report)["imageUUID"]


@pytest.mark.parametrize("adapter", ALL)
def test_default_delivery_ends_with_the_image(
    runs: Callable[[Adapter], Run], adapter: Adapter, live_server: UpscaleTestServer, source: SourceImage
) -> None:
    """No deliveryMethod: sync for some SDKs, async with polling for runware-sdk; the user gets the image."""
    item = single(step_result(runs(adapter).report, "default-delivery"))
    adapter.check_result_item(item)
    check_upscaled(item, server=live_server, source=source, factor=2, task_type=adapter.task_type)


@pytest.mark.parametrize("adapter", by(lambda adapter: adapter.polls_async_itself))
def test_async_polled_by_the_sdk_then_get_response(
    runs: Callable[[Adapter], Run], adapter: Adapter, live_server: UpscaleTestServer, source: SourceImage
) -> None:
    """The SDK's own async flow returns the image under the caller's taskUUID; ``getResponse`` afterwards
    returns the same result again."""
    run = runs(adapter)
    flow = run.own_async
    assert flow is not None and flow.again is not None
    checks: dict[str, Any] = {
        "server": live_server,
        "source": source,
        "factor": 2,
        "output_type": "dataURI",
        "output_format": "WEBP",
        "task_type": adapter.task_type,
        "cost": True,
    }
    item = single(step_result(run.report, flow.result))
    assert item["taskUUID"] == flow.task_uuid
    assert item["status"] == "success"
    check_upscaled(item, **checks)
    polled = single(step_result(run.report, flow.again))
    assert polled["taskUUID"] == flow.task_uuid
    assert polled["status"] == "success"
    assert polled["imageUUID"] == item["imageUUID"]
    check_upscaled(polled, **checks)


@pytest.mark.parametrize("case", ACK_CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("adapter", by(lambda adapter: adapter.returns_async_ack))
def test_async_ack_then_get_response(
    runs: Callable[[Adapter], Run],
    adapter: Adapter,
    case: AckCase,
    live_server: UpscaleTestServer,
    source: SourceImage,
) -> None:
    """``deliveryMethod: "async"`` answered by the ACK (taskType and taskUUID only); ``getResponse`` then
    returns the finished image."""
    run = runs(adapter)
    flow = run.ack_async[case.name]
    assert flow.ack is not None
    ack = single(step_result(run.report, flow.ack))
    assert ack == adapter.ack_shape(ack["taskUUID"])
    assert str(uuid.UUID(ack["taskUUID"])) == ack["taskUUID"]
    if flow.wait is not None:
        assert step_result(run.report, flow.wait)["status"] == "success"
    item = single(step_result(run.report, flow.result))
    adapter.check_result_item(item)
    assert item["taskUUID"] == ack["taskUUID"]
    assert item["status"] == "success"
    check_upscaled(
        item,
        server=live_server,
        source=source,
        factor=2,
        output_type="base64Data",
        output_format=case.output_format,
        task_type=adapter.task_type,
        cost=case.include_cost,
    )


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("adapter", ALL)
def test_server_errors_reach_the_user(runs: Callable[[Adapter], Run], adapter: Adapter, case: ErrorCase) -> None:
    """A refused upscale fails the call with the SDK's error type, the code it exposes (the raw server code,
    or runware-sdk's category), the parameter and taskType the server named, a message naming the culprit
    and, where the SDK exposes it, the HTTP status."""
    error = adapter.user_error(step_error(runs(adapter).report, case.name))
    assert error.kind == adapter.error_kind
    assert error.code == adapter.expected_code(case.server_code)
    assert error.parameter == adapter.expected_parameter(case.parameter)
    assert error.task_type == adapter.task_type
    assert case.named in error.message, error.message
    assert error.status_code == adapter.expected_status(case.http_status)


EXTRAS = [
    pytest.param(adapter, name, id=f"{adapter.id}-{name}") for adapter in ADAPTERS for name in adapter.extra_names
]


@pytest.mark.parametrize(("adapter", "name"), EXTRAS)
def test_sdk_specific_scenario(
    runs: Callable[[Adapter], Run], adapter: Adapter, name: str, live_server: UpscaleTestServer, source: SourceImage
) -> None:
    """What only one SDK can do (a local file path; a generic ``run()`` of the legacy task): its adapter checks it."""
    run = runs(adapter)
    (extra,) = [extra for extra in run.extras if extra.name == name]
    extra.check(run.report, live_server, source)


@pytest.mark.parametrize("adapter", ALL)
def test_wrong_api_key_is_refused(live_server: UpscaleTestServer, source: SourceImage, adapter: Adapter) -> None:
    """A client with a wrong key uploads nothing, and its user reads the server's invalidApiKey message
    (raised where and as the adapter says)."""
    report = run_client(adapter.command(live_server, "wrong-key"), {"steps": [adapter.upload_step(source)]})
    message = adapter.check_wrong_key(report)
    assert not report["steps"]["upload"]["ok"], report["steps"]["upload"]
    assert "Invalid API key" in message, message

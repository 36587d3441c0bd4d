"""PyPI ``runware-sdk`` 1.8.0, the official new Python SDK, against a live server: WebSocket and REST.

The SDK is pointed at the server with ``Runware(api_key=..., ws_base_url="ws://.../v1")`` or
``Runware(api_key=..., transport="rest", http_base_url="http://.../v1")``; every call goes through its
public API (``connect``, ``image_upload``, ``run``, ``get_response``, ``close``) in
``tests/e2e/clients/runware_sdk_client.py``, run by the interpreter of ``.venv-sdk-runware-sdk``.
Plans always pass ``taskType`` and AIR model ids, with ``validate`` off, so the SDK never asks
Runware's schema registry. Every test runs once per transport; one client process per transport.

This SDK hides the server's raw error code on purpose and exposes a category instead
(``RunwareError.code``: ``auth``, ``validation``, ``notFound``...), derived from the raw code by its
``errors.derive_code``; the tests check that category, the ``parameter`` and the message.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.clients.harness import (
    DEFAULT_MODEL,
    FAST_MODEL,
    UNKNOWN_UUID,
    UPSCALE_CASES,
    SourceImage,
    UpscaleCase,
    check_uploaded,
    check_upscaled,
    make_source,
    run_client,
    runware_sdk_command,
    single,
    source_value,
    step_error,
    step_result,
)
from tests.e2e.conftest import LiveServer

TRANSPORTS = ["websocket", "rest"]


def url_for(server: LiveServer, transport: str) -> str:
    return server.ws_url if transport == "websocket" else f"{server.url}/v1"


def upscale_task(case: UpscaleCase, source: SourceImage) -> dict[str, Any]:
    """``run()`` parameters for a case, in this SDK's own shape: ``upscale`` with ``inputs.image``."""
    return {
        "taskType": "upscale",
        **case.options(),
        "model": case.model or DEFAULT_MODEL,
        "inputs": {"image": source_value(source, case.source)},
        "deliveryMethod": "sync",
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SourceImage:
    return make_source(tmp_path_factory.mktemp("sdk-runware-sdk"))


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def async_task_uuid(transport: str) -> str:
    """The caller-chosen taskUUID of the async upscale, so the plan can getResponse it afterwards."""
    return str(uuid.uuid4())


@pytest.fixture(scope="module")
def report(
    live_server: LiveServer,
    provisioned_models_dir: Path,
    source: SourceImage,
    transport: str,
    async_task_uuid: str,
) -> dict[str, Any]:
    """Run every scenario with one client of this transport (wrong-key scenarios excepted)."""
    fast = {"taskType": "upscale", "model": FAST_MODEL, "upscaleFactor": 2, "deliveryMethod": "sync"}
    uploaded = {"inputs": {"image": "${upload.imageUUID}"}}
    steps: list[dict[str, Any]] = [
        {"name": "upload", "op": "image_upload", "args": {"image": source.data_uri}},
        *({"name": case.name, "op": "run", "args": upscale_task(case, source)} for case in UPSCALE_CASES),
        # The legacy task name and image field pass straight through this SDK's run().
        {
            "name": "legacy-imageUpscale",
            "op": "run",
            "args": {**fast, "taskType": "imageUpscale", "inputImage": "${upload.imageURL}", "outputFormat": "PNG"},
        },
        # Async: the SDK waits for the ACK and polls getResponse itself; then getResponse by hand.
        {
            "name": "async",
            "op": "run",
            "args": {
                **fast,
                **uploaded,
                "taskUUID": async_task_uuid,
                "deliveryMethod": "async",
                "outputType": "dataURI",
                "outputFormat": "WEBP",
                "includeCost": True,
            },
        },
        {"name": "async-get-response", "op": "get_response", "args": {"taskUUID": async_task_uuid}},
        # No deliveryMethod: this SDK then sends "async" and polls.
        {
            "name": "default-delivery",
            "op": "run",
            "args": {key: value for key, value in {**fast, **uploaded}.items() if key != "deliveryMethod"},
        },
        # Errors.
        {"name": "factor-7", "op": "run", "args": {**fast, **uploaded, "upscaleFactor": 7}},
        {"name": "unknown-model", "op": "run", "args": {**fast, **uploaded, "model": "local:no-such-model@1"}},
        {"name": "unknown-image", "op": "run", "args": {**fast, "inputs": {"image": UNKNOWN_UUID}}},
    ]
    command = [
        *runware_sdk_command(),
        *("--transport", transport, "--url", url_for(live_server, transport)),
        *("--api-key", live_server.api_key),
    ]
    return run_client(command, {"steps": steps})


def test_connects_and_closes(report: dict[str, Any]) -> None:
    assert report["version"] == "1.8.0"
    assert report["connect"]["ok"], report["connect"]
    assert report["disconnect"]["ok"], report["disconnect"]


def test_image_upload_of_a_data_uri(report: dict[str, Any], live_server: LiveServer, source: SourceImage) -> None:
    item = single(step_result(report, "upload"))
    assert item["taskType"] == "imageUpload"
    check_uploaded(item, server=live_server, source=source)


@pytest.mark.parametrize("case", UPSCALE_CASES, ids=lambda case: case.name)
def test_sync_upscale(report: dict[str, Any], live_server: LiveServer, source: SourceImage, case: UpscaleCase) -> None:
    """Each input form, outputType and outputFormat through ``run({"taskType": "upscale", ...})``."""
    item = single(step_result(report, case.name))
    check_upscaled(
        item,
        server=live_server,
        source=source,
        factor=case.factor,
        output_type=case.expected_type,
        output_format=case.expected_format,
        task_type="upscale",
        cost=case.include_cost,
    )
    if case.source == "uuid":
        assert item["inputImageUUID"] == single(step_result(report, "upload"))["imageUUID"]


def test_legacy_image_upscale_task(report: dict[str, Any], live_server: LiveServer, source: SourceImage) -> None:
    item = single(step_result(report, "legacy-imageUpscale"))
    check_upscaled(item, server=live_server, source=source, factor=2, output_format="PNG", task_type="imageUpscale")


def test_async_upscale_and_get_response(
    report: dict[str, Any], live_server: LiveServer, source: SourceImage, async_task_uuid: str
) -> None:
    """The SDK's own async flow returns the image; ``get_response`` afterwards returns it again."""
    checks: dict[str, Any] = {
        "server": live_server,
        "source": source,
        "factor": 2,
        "output_type": "dataURI",
        "output_format": "WEBP",
        "task_type": "upscale",
        "cost": True,
    }
    item = single(step_result(report, "async"))
    assert item["taskUUID"] == async_task_uuid
    check_upscaled(item, **checks)
    polled = single(step_result(report, "async-get-response"))
    assert polled["taskUUID"] == async_task_uuid
    assert polled["status"] == "success"
    assert polled["imageUUID"] == item["imageUUID"]
    check_upscaled(polled, **checks)


def test_default_delivery_is_async_and_completes(
    report: dict[str, Any], live_server: LiveServer, source: SourceImage
) -> None:
    item = single(step_result(report, "default-delivery"))
    check_upscaled(item, server=live_server, source=source, factor=2, task_type="upscale")


def test_upscale_factor_7_is_a_validation_error(report: dict[str, Any], transport: str) -> None:
    error = step_error(report, "factor-7")
    assert error["type"] == "RunwareError"
    assert (error["code"], error["parameter"], error["task_type"]) == ("validation", "upscaleFactor", "upscale")
    assert "upscaleFactor" in error["message"]
    assert error["status_code"] == (400 if transport == "rest" else None)


def test_unknown_model_is_a_validation_error_on_model(report: dict[str, Any], transport: str) -> None:
    """The server's ``invalidModel`` reaches users as category ``validation`` on ``model``."""
    error = step_error(report, "unknown-model")
    assert (error["code"], error["parameter"]) == ("validation", "model")
    assert "local:no-such-model@1" in error["message"]
    assert error["status_code"] == (400 if transport == "rest" else None)


def test_unknown_image_uuid_is_not_found(report: dict[str, Any], transport: str) -> None:
    error = step_error(report, "unknown-image")
    assert (error["code"], error["parameter"]) == ("notFound", "inputs.image")
    assert UNKNOWN_UUID in error["message"]
    assert error["status_code"] == (404 if transport == "rest" else None)


def test_wrong_api_key_is_an_auth_error(live_server: LiveServer, transport: str) -> None:
    """WebSocket: ``connect()`` already fails; REST: the first request fails with 401. Both ``auth``."""
    steps = [{"name": "upload", "op": "image_upload", "args": {"image": "aGVsbG8="}}]
    command = [
        *runware_sdk_command(),
        *("--transport", transport, "--url", url_for(live_server, transport), "--api-key", "wrong-key"),
    ]
    report = run_client(command, {"steps": steps})
    error = step_error(report, "upload")
    assert error["code"] == "auth"
    assert "Invalid API key" in error["message"]
    if transport == "websocket":
        assert not report["connect"]["ok"]
        assert report["connect"]["error"]["code"] == "auth"
    else:
        assert error["status_code"] == 401

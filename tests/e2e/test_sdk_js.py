"""npm ``@runware/sdk-js`` 1.3.2, the official JavaScript SDK (``RunwareServer``, Node), against a live server.

The SDK is pointed at the server with ``RunwareServer.initialize({apiKey, url: "ws://.../v1"})``;
every call goes through its public API (``imageUpload``, ``upscale``, ``getResponse``,
``disconnect``) in ``tests/e2e/js/client.mjs``, run by node from ``tests/e2e/js`` (whose
``node_modules`` ``scripts/setup-sdks`` installs from the committed lock file). One client process
runs the whole plan below; the tests check each step of its report.

This SDK sends ``taskType: "upscale"``, passes string inputs through unchanged, answers a sync call
with the first data item carrying its taskUUID, and for ``deliveryMethod: "async"`` polls
``getResponse`` every 2 s itself (or returns the ACK with ``skipResponse: true``). Server errors
reject with ``{error: {code, message, ...}}``: the raw server code reaches the user.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.clients.harness import (
    FAST_MODEL,
    UNKNOWN_UUID,
    UPSCALE_CASES,
    SourceImage,
    UpscaleCase,
    check_uploaded,
    check_upscaled,
    js_command,
    make_source,
    run_client,
    single,
    step_error,
    step_result,
    upscale_args,
)
from tests.e2e.conftest import LiveServer

TASK_TYPE = "upscale"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SourceImage:
    return make_source(tmp_path_factory.mktemp("sdk-js"))


@pytest.fixture(scope="module")
def report(live_server: LiveServer, provisioned_models_dir: Path, source: SourceImage) -> dict[str, Any]:
    """Run every scenario with one SDK connection (wrong-key scenarios excepted)."""
    fast = {"model": FAST_MODEL, "upscaleFactor": 2, "inputImage": "${upload.imageUUID}"}
    steps: list[dict[str, Any]] = [
        {"name": "upload", "op": "imageUpload", "args": {"image": source.data_uri}},
        *({"name": case.name, "op": "upscale", "args": upscale_args(case, source)} for case in UPSCALE_CASES),
        # Async, the SDK polling getResponse itself (every 2 s) until the image is there.
        {
            "name": "async",
            "op": "upscale",
            "args": {
                **fast,
                "deliveryMethod": "async",
                "outputType": "dataURI",
                "outputFormat": "WEBP",
                "includeCost": True,
            },
        },
        # Async with skipResponse: the ACK; then the user polls getResponse.
        {
            "name": "async-ack",
            "op": "upscale",
            "args": {
                **fast,
                "deliveryMethod": "async",
                "skipResponse": True,
                "outputType": "base64Data",
                "outputFormat": "PNG",
            },
        },
        {"name": "async-poll", "op": "poll", "args": {"taskUUID": "${async-ack.taskUUID}"}},
        # Errors.
        {"name": "factor-7", "op": "upscale", "args": {**fast, "upscaleFactor": 7}},
        {"name": "unknown-model", "op": "upscale", "args": {**fast, "model": "local:no-such-model@1"}},
        {"name": "unknown-image", "op": "upscale", "args": {**fast, "inputImage": UNKNOWN_UUID}},
    ]
    command = [*js_command(), "--url", live_server.ws_url, "--api-key", live_server.api_key]
    return run_client(command, {"steps": steps})


def test_connects_and_disconnects(report: dict[str, Any]) -> None:
    assert report["version"] == "1.3.2"
    assert report["connect"]["ok"], report["connect"]
    assert report["disconnect"]["ok"], report["disconnect"]


def test_image_upload_of_a_data_uri(report: dict[str, Any], live_server: LiveServer, source: SourceImage) -> None:
    item = single(step_result(report, "upload"))
    assert item["taskType"] == "imageUpload"
    check_uploaded(item, server=live_server, source=source)


@pytest.mark.parametrize("case", UPSCALE_CASES, ids=lambda case: case.name)
def test_sync_upscale(report: dict[str, Any], live_server: LiveServer, source: SourceImage, case: UpscaleCase) -> None:
    """Each input form, outputType and outputFormat through ``upscale()`` (sync)."""
    item = single(step_result(report, case.name))
    check_upscaled(
        item,
        server=live_server,
        source=source,
        factor=case.factor,
        output_type=case.expected_type,
        output_format=case.expected_format,
        task_type=TASK_TYPE,
        cost=case.include_cost,
    )
    if case.source == "uuid":
        assert item["inputImageUUID"] == single(step_result(report, "upload"))["imageUUID"]


def test_async_upscale_polled_by_the_sdk(report: dict[str, Any], live_server: LiveServer, source: SourceImage) -> None:
    item = single(step_result(report, "async"))
    assert item["status"] == "success"
    check_upscaled(
        item,
        server=live_server,
        source=source,
        factor=2,
        output_type="dataURI",
        output_format="WEBP",
        task_type=TASK_TYPE,
        cost=True,
    )


def test_async_ack_then_get_response(report: dict[str, Any], live_server: LiveServer, source: SourceImage) -> None:
    """``skipResponse`` returns the ACK (taskType + taskUUID only); ``getResponse`` then the image."""
    ack = single(step_result(report, "async-ack"))
    assert ack == {"taskType": TASK_TYPE, "taskUUID": ack["taskUUID"]}
    assert str(uuid.UUID(ack["taskUUID"])) == ack["taskUUID"]
    item = single(step_result(report, "async-poll"))
    assert item["taskUUID"] == ack["taskUUID"]
    assert item["status"] == "success"
    check_upscaled(
        item,
        server=live_server,
        source=source,
        factor=2,
        output_type="base64Data",
        output_format="PNG",
        task_type=TASK_TYPE,
    )


def test_upscale_factor_7_is_invalid_upscale_factor(report: dict[str, Any]) -> None:
    error = step_error(report, "factor-7")
    assert error["type"] == "ApiError"
    assert error["code"] == "invalidUpscaleFactor"
    assert error["error"]["parameter"] == "upscaleFactor"
    assert error["error"]["taskType"] == TASK_TYPE


def test_unknown_model_is_invalid_model(report: dict[str, Any]) -> None:
    error = step_error(report, "unknown-model")
    assert (error["type"], error["code"]) == ("ApiError", "invalidModel")
    assert error["error"]["parameter"] == "model"
    assert "local:no-such-model@1" in error["message"]


def test_unknown_image_uuid_is_named(report: dict[str, Any]) -> None:
    error = step_error(report, "unknown-image")
    assert (error["type"], error["code"]) == ("ApiError", "imageNotFound")
    assert error["error"]["parameter"] == "inputImage"
    assert UNKNOWN_UUID in error["message"]


def test_wrong_api_key_is_invalid_api_key(live_server: LiveServer) -> None:
    """``initialize`` rejects with the server's ``invalidApiKey`` error (and stops reconnecting)."""
    steps = [{"name": "upload", "op": "imageUpload", "args": {"image": "aGVsbG8="}}]
    command = [*js_command(), "--url", live_server.ws_url, "--api-key", "wrong-key"]
    report = run_client(command, {"steps": steps})
    connect = report["connect"]
    assert not connect["ok"]
    assert connect["error"]["code"] == "invalidApiKey"
    assert connect["error"]["error"]["taskType"] == "authentication"
    assert "Invalid API key" in connect["error"]["message"]
    assert not report["steps"]["upload"]["ok"]

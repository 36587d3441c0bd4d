"""PyPI ``runware`` 0.5.24, the official Python SDK, against a live server over WebSocket.

The SDK is pointed at the server with ``Runware(api_key=..., url="ws://127.0.0.1:PORT/v1")``, the one
knob it has for that; every call goes through its public API (``connect``, ``uploadImage``,
``imageUpscale(IImageUpscale(...))``, ``getResponse``, ``disconnect``) in
``tests/e2e/clients/runware_client.py``, run by the interpreter of ``.venv-sdk-runware``. One client
process runs the whole plan below; the tests then check each step of its report.

This SDK always sends ``taskType: "imageUpscale"`` and, for a string input (UUID, URL, data URI,
base64), sends it unchanged; only a local file path is uploaded first (as a data URI).
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
    make_source,
    run_client,
    runware_command,
    single,
    step_error,
    step_result,
    upscale_args,
)
from tests.e2e.conftest import LiveServer

TASK_TYPE = "imageUpscale"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SourceImage:
    return make_source(tmp_path_factory.mktemp("sdk-runware"))


@pytest.fixture(scope="module")
def report(live_server: LiveServer, provisioned_models_dir: Path, source: SourceImage) -> dict[str, Any]:
    """Run every scenario with one SDK connection (wrong-key scenarios excepted)."""
    fast = {"model": FAST_MODEL, "upscaleFactor": 2}
    steps: list[dict[str, Any]] = [
        {"name": "upload", "op": "upload", "args": {"image": str(source.path)}},
        *({"name": case.name, "op": "upscale", "args": upscale_args(case, source)} for case in UPSCALE_CASES),
        # The everyday call: a local file, which the SDK uploads itself before upscaling its UUID.
        {
            "name": "local-file",
            "op": "upscale",
            "args": {"inputImage": str(source.path), **fast, "outputType": "URL", "outputFormat": "PNG"},
        },
        # Async: the ACK, then (once REST says the task is done, because this SDK waits ~30 s per
        # "processing" answer) the SDK's own getResponse.
        {
            "name": "async-ack",
            "op": "upscale",
            "args": {
                "inputImage": "${upload.imageUUID}",
                **fast,
                "outputType": "base64Data",
                "outputFormat": "WEBP",
                "includeCost": True,
                "deliveryMethod": "async",
            },
        },
        {
            "name": "async-wait",
            "op": "rest_wait",
            "args": {
                "restURL": f"{live_server.url}/v1",
                "apiKey": live_server.api_key,
                "taskUUID": "${async-ack.taskUUID}",
            },
        },
        {"name": "async-result", "op": "get_response", "args": {"taskUUID": "${async-ack.taskUUID}"}},
        # Errors.
        {
            "name": "factor-7",
            "op": "upscale",
            "args": {"inputImage": "${upload.imageUUID}", **fast, "upscaleFactor": 7},
        },
        {
            "name": "unknown-model",
            "op": "upscale",
            "args": {"inputImage": "${upload.imageUUID}", **fast, "model": "local:no-such-model@1"},
        },
        {"name": "unknown-image", "op": "upscale", "args": {"inputImage": UNKNOWN_UUID, **fast}},
    ]
    command = [*runware_command(), "--url", live_server.ws_url, "--api-key", live_server.api_key]
    return run_client(command, {"steps": steps})


def test_connects_and_disconnects(report: dict[str, Any]) -> None:
    assert report["version"] == "0.5.24"
    assert report["connect"]["ok"], report["connect"]
    assert report["disconnect"]["ok"], report["disconnect"]


def test_upload_of_a_local_file(report: dict[str, Any], live_server: LiveServer, source: SourceImage) -> None:
    """``uploadImage(path)`` sends the file as a data URI; the answer's imageURL serves the same picture."""
    upload = step_result(report, "upload")
    assert upload["_class"] == "UploadImageType"
    check_uploaded(upload, server=live_server, source=source)


@pytest.mark.parametrize("case", UPSCALE_CASES, ids=lambda case: case.name)
def test_sync_upscale(report: dict[str, Any], live_server: LiveServer, source: SourceImage, case: UpscaleCase) -> None:
    """Each input form, outputType and outputFormat through ``imageUpscale`` (sync)."""
    item = single(step_result(report, case.name))
    assert item["_class"] == "IImage"
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
        assert item["inputImageUUID"] == step_result(report, "upload")["imageUUID"]


def test_sync_upscale_of_a_local_file(report: dict[str, Any], live_server: LiveServer, source: SourceImage) -> None:
    item = single(step_result(report, "local-file"))
    check_upscaled(item, server=live_server, source=source, factor=2, output_format="PNG", task_type=TASK_TYPE)


def test_async_upscale_then_get_response(report: dict[str, Any], live_server: LiveServer, source: SourceImage) -> None:
    """``deliveryMethod="async"`` returns an ``IAsyncTaskResponse``; ``getResponse`` then the image."""
    ack = step_result(report, "async-ack")
    assert ack == {"_class": "IAsyncTaskResponse", "taskType": TASK_TYPE, "taskUUID": ack["taskUUID"]}
    assert str(uuid.UUID(ack["taskUUID"])) == ack["taskUUID"]
    assert step_result(report, "async-wait")["status"] == "success"
    item = single(step_result(report, "async-result"))
    assert item["_class"] == "IImage"
    assert item["taskUUID"] == ack["taskUUID"]
    assert item["status"] == "success"
    check_upscaled(
        item,
        server=live_server,
        source=source,
        factor=2,
        output_type="base64Data",
        output_format="WEBP",
        task_type=TASK_TYPE,
        cost=True,
    )


def test_upscale_factor_7_is_a_validation_error(report: dict[str, Any]) -> None:
    error = step_error(report, "factor-7")
    assert error["type"] == "RunwareAPIError"
    assert error["code"] == "invalidUpscaleFactor"
    assert error["error_data"]["parameter"] == "upscaleFactor"
    assert error["error_data"]["taskType"] == TASK_TYPE


def test_unknown_model_is_invalid_model(report: dict[str, Any]) -> None:
    error = step_error(report, "unknown-model")
    assert error["type"] == "RunwareAPIError"
    assert error["code"] == "invalidModel"
    assert error["error_data"]["parameter"] == "model"
    assert "local:no-such-model@1" in error["error_data"]["message"]


def test_unknown_image_uuid_is_named(report: dict[str, Any]) -> None:
    error = step_error(report, "unknown-image")
    assert error["type"] == "RunwareAPIError"
    assert error["code"] == "imageNotFound"
    assert UNKNOWN_UUID in error["error_data"]["message"]
    assert error["error_data"]["parameter"] == "inputImage"


@pytest.fixture(scope="module")
def wrong_key_report(live_server: LiveServer, source: SourceImage) -> dict[str, Any]:
    """A client with a wrong key tries to upload (this SDK connects without complaint, then refuses)."""
    steps = [{"name": "upload", "op": "upload", "args": {"image": str(source.path)}}]
    command = [*runware_command(), "--url", live_server.ws_url, "--api-key", "wrong-key"]
    return run_client(command, {"steps": steps})


def test_wrong_api_key_is_refused(wrong_key_report: dict[str, Any]) -> None:
    """The SDK raises ``ConnectionError`` (its only signal for auth failures) and uploads nothing."""
    error = step_error(wrong_key_report, "upload")
    assert error["type"] == "ConnectionError"


def test_wrong_api_key_error_says_invalid_api_key(wrong_key_report: dict[str, Any]) -> None:
    """The message the SDK raises is the server's invalidApiKey message (the SDK exposes no code)."""
    error = step_error(wrong_key_report, "upload")
    assert "Invalid API key" in error["message"], error["message"]

"""Async upscales answer what can fail without the image at once, as sync ones do; the rest reports later."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession

from tests.api_helpers import api_client, data_uri, encode, photo_crop, resize_settings, upscale_task

KEY = "async-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MISSING_UUID = "6b1d5bd8-0c7b-4bd4-9f93-7f7b07a6d6a1"

#: fields -> (HTTP status, code, parameter) of the immediate answer
EARLY = {
    "parameter": ({"upscaleFactor": 5}, 400, "invalidUpscaleFactor", "upscaleFactor"),
    "model": ({"model": "runware:500@1"}, 400, "invalidModel", "model"),
    "image-uuid": ({"inputImage": MISSING_UUID}, 404, "imageNotFound", "inputImage"),
    "refused-url": ({"inputImage": "http://127.0.0.1:9/cat.png"}, 400, "unsupportedAddress", "inputImage"),
    "metadata-url": ({"inputImage": "http://169.254.169.254/latest"}, 400, "unsupportedAddress", "inputImage"),
    "not-http": ({"inputImage": "file:///etc/passwd"}, 400, "invalidInputImage", "inputImage"),
    "bad-base64": ({"inputImage": "not*base64"}, 400, "invalidInputImage", "inputImage"),
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with api_client(resize_settings(tmp_path, api_keys=[KEY])) as test_client:
        yield test_client


def async_task(**fields: Any) -> dict[str, Any]:
    return upscale_task(data_uri(encode(photo_crop())), deliveryMethod="async", **fields)


def post(client: TestClient, tasks: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    response = client.post("/v1", json=tasks, headers=AUTH)
    return response.status_code, response.json()


def connect(client: TestClient) -> Any:
    return client.websocket_connect("/v1")


def ws_exchange(ws: WebSocketTestSession, task: dict[str, Any]) -> dict[str, Any]:
    ws.send_text(json.dumps([task]))
    frame: dict[str, Any] = json.loads(ws.receive_text())
    return frame


def ws_auth(ws: WebSocketTestSession) -> None:
    ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
    assert "data" in json.loads(ws.receive_text())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(EARLY))
def test_errors_found_without_the_image_are_the_immediate_answer_rest(client: TestClient, case: str) -> None:
    fields, status, code, parameter = EARLY[case]
    task = async_task(**fields)
    got, body = post(client, [task])
    assert got == status, body
    assert "data" not in body
    error = body["errors"][0]
    assert (error["code"], error["parameter"], error["taskUUID"]) == (code, parameter, task["taskUUID"])
    # Nothing was accepted: the taskUUID is still free, and getResponse knows no such task.
    poll_status, poll = post(client, [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
    assert poll_status == 404 and poll["errors"][0]["code"] == "taskNotFound"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(EARLY))
def test_errors_found_without_the_image_are_the_immediate_answer_ws(client: TestClient, case: str) -> None:
    fields, _, code, parameter = EARLY[case]
    task = async_task(**fields)
    with connect(client) as ws:
        ws_auth(ws)
        frame = ws_exchange(ws, task)
        assert "data" not in frame, frame  # an error instead of the acknowledgement
        error = frame["errors"][0]
        assert (error["code"], error["parameter"], error["taskUUID"]) == (code, parameter, task["taskUUID"])


def test_a_refused_task_can_be_sent_again_with_its_uuid(client: TestClient) -> None:
    task = async_task(model="runware:501@1")
    assert post(client, [task])[0] == 400
    task["model"] = "local:realesr-animevideov3@1"
    status, body = post(client, [task])
    assert status == 200 and body["data"] == [{"taskType": "imageUpscale", "taskUUID": task["taskUUID"]}]


def test_a_stored_image_uuid_is_acknowledged(client: TestClient) -> None:
    status, body = post(
        client,
        [
            {
                "taskType": "imageUpload",
                "taskUUID": upscale_task("x")["taskUUID"],
                "image": data_uri(encode(photo_crop())),
            }
        ],
    )
    assert status == 200, body
    task = async_task(inputImage=body["data"][0]["imageUUID"])
    assert post(client, [task]) == (200, {"data": [{"taskType": "imageUpscale", "taskUUID": task["taskUUID"]}]})


@pytest.mark.timeout(30)
def test_an_image_that_does_not_decode_reports_through_get_response_rest(client: TestClient) -> None:
    task = async_task(inputImage="bm90IGFuIGltYWdl")  # valid base64 of bytes that are no image
    assert post(client, [task]) == (200, {"data": [{"taskType": "imageUpscale", "taskUUID": task["taskUUID"]}]})
    poll: dict[str, Any] = {}
    for _ in range(200):  # bounded; each poll is answered at once, so this waits on the task, not on time
        _, poll = post(client, [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        if "errors" in poll:
            break
    error = poll["errors"][0]
    assert (error["code"], error["taskUUID"]) == ("invalidImage", task["taskUUID"])


@pytest.mark.timeout(30)
def test_an_image_that_does_not_decode_reports_later_ws(client: TestClient) -> None:
    task = async_task(inputImage="bm90IGFuIGltYWdl")
    with connect(client) as ws:
        ws_auth(ws)
        assert ws_exchange(ws, task) == {"data": [{"taskType": "imageUpscale", "taskUUID": task["taskUUID"]}]}
        frame: dict[str, Any] = {}
        for _ in range(200):  # bounded; each getResponse is answered at once
            frame = ws_exchange(ws, {"taskType": "getResponse", "taskUUID": task["taskUUID"]})
            if "errors" in frame:
                break
        error = frame["errors"][0]
        assert (error["code"], error["taskUUID"]) == ("invalidImage", task["taskUUID"])


def test_task_errors_are_logged_with_code_message_and_uuid(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    task = async_task(model="runware:503@1")
    with caplog.at_level(logging.INFO, logger="upscale_server.protocol"):
        assert post(client, [task])[0] == 400
    [record] = [r for r in caplog.records if task["taskUUID"] in r.getMessage()]
    assert record.levelno == logging.INFO  # the default level (UPSCALE_LOG_LEVEL=info) shows it
    assert "invalidModel" in record.getMessage() and "runware:503@1" in record.getMessage()

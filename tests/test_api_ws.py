"""WebSocket ``/v1``: handshake, ping, pushed results and errors, through the real app."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession

from tests.api_helpers import api_client, data_uri, encode, new_uuid, photo_crop, resize_settings, upscale_task

KEY = "ws-key"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with api_client(resize_settings(tmp_path, api_keys=[KEY])) as test_client:
        yield test_client


def send(ws: WebSocketTestSession, tasks: list[dict[str, Any]]) -> None:
    ws.send_text(json.dumps(tasks))


def receive(ws: WebSocketTestSession) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(ws.receive_text())
    assert not ("data" in frame and "errors" in frame), frame
    return frame


def authenticate(ws: WebSocketTestSession, **extra: Any) -> dict[str, Any]:
    send(ws, [{"taskType": "authentication", "apiKey": KEY, **extra}])
    return receive(ws)


def test_handshake_ping_and_query_strings(client: TestClient) -> None:
    with client.websocket_connect("/v1?sdk=js&version=1.3.2&dryRun=1") as ws:
        frame = authenticate(ws)
        item = frame["data"][0]
        assert set(item) == {"taskType", "connectionSessionUUID"}
        assert item["taskType"] == "authentication"
        send(ws, [{"taskType": "ping", "ping": True}])
        assert receive(ws) == {"data": [{"taskType": "ping", "pong": True}]}


def test_supplied_session_uuid_is_kept(client: TestClient) -> None:
    session = new_uuid()
    with client.websocket_connect("/v1") as ws:
        assert authenticate(ws, connectionSessionUUID=session)["data"][0]["connectionSessionUUID"] == session


def test_wrong_key_is_answered_with_errors_and_error_and_the_socket_stays_open(client: TestClient) -> None:
    with client.websocket_connect("/v1") as ws:
        send(ws, [{"taskType": "authentication", "apiKey": "wrong"}])
        frame = json.loads(ws.receive_text())
        assert set(frame) == {"errors", "error"}, frame
        error = frame["errors"][0]
        assert error["code"] == "invalidApiKey" and error["taskType"] == "authentication"
        assert "taskUUID" not in error
        assert frame["error"] == error  # the singular object the TypeScript SDK reads
        # Open still (the Python runware SDK hangs on a socket closed under it): pings are answered.
        send(ws, [{"taskType": "ping", "ping": True}])
        assert receive(ws) == {"data": [{"taskType": "ping", "pong": True}]}


def test_tasks_before_auth(client: TestClient) -> None:
    with client.websocket_connect("/v1") as ws:
        task = upscale_task("whatever")
        send(ws, [task])
        error = receive(ws)["errors"][0]
        assert error["code"] == "missingApiKey" and error["taskUUID"] == task["taskUUID"]


def test_sync_upscale_pushes_exactly_one_frame(client: TestClient) -> None:
    with client.websocket_connect("/v1") as ws:
        authenticate(ws)
        task = upscale_task(data_uri(encode(photo_crop())), outputType="base64Data")
        send(ws, [task])
        frame = receive(ws)
        item = frame["data"][0]
        assert item["taskUUID"] == task["taskUUID"] and "imageBase64Data" in item
        send(ws, [{"taskType": "ping", "ping": True}])
        assert receive(ws) == {"data": [{"taskType": "ping", "pong": True}]}  # nothing else was queued


def test_good_and_bad_tasks_arrive_in_separate_frames(client: TestClient) -> None:
    with client.websocket_connect("/v1") as ws:
        authenticate(ws)
        good = upscale_task(data_uri(encode(photo_crop())))
        bad = upscale_task(data_uri(encode(photo_crop())), outputQuality=100)
        send(ws, [good, bad])
        frames = [receive(ws), receive(ws)]
        errors = [f for f in frames if "errors" in f]
        data = [f for f in frames if "data" in f]
        assert errors[0]["errors"][0]["taskUUID"] == bad["taskUUID"]
        assert errors[0]["errors"][0]["max"] == 99
        assert data[0]["data"][0]["taskUUID"] == good["taskUUID"]


def test_malformed_frames_get_errors_and_keep_the_socket(client: TestClient) -> None:
    with client.websocket_connect("/v1") as ws:
        authenticate(ws)
        ws.send_text("{not json")
        assert receive(ws)["errors"][0]["code"] == "invalidRequest"
        send(ws, [{"taskType": "nope", "taskUUID": new_uuid()}])
        assert receive(ws)["errors"][0]["code"] == "invalidTaskType"
        send(ws, [{"taskType": "ping", "ping": True}])
        assert receive(ws)["data"][0]["pong"] is True

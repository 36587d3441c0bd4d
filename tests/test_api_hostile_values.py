"""Values no client should send are a 400 on both transports, never a 500, and are echoed only in part."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api_helpers import api_client, data_uri, encode, photo_crop, poll, resize_settings, upscale_task
from upscale_server.errors import ECHO_CHARS, MAX_MESSAGE_CHARS

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
#: An integer no float holds: 1 followed by 400 zeros, as JSON text.
HUGE = "1" + "0" * 400
LONG_MODEL = "runware:" + "9" * 5_000_000 + "@1"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with api_client(resize_settings(tmp_path, api_keys=[KEY])) as test_client:
        yield test_client


def image() -> str:
    return data_uri(encode(photo_crop()))


def body_with(task: dict[str, Any], field: str, literal: str) -> str:
    """``[task]`` as JSON text with ``field`` set to the raw JSON ``literal``."""
    return json.dumps([{**task, field: "@@"}]).replace('"@@"', literal)


def rest(client: TestClient, body: str) -> tuple[int, dict[str, Any]]:
    response = client.post("/v1", content=body, headers=AUTH)
    return response.status_code, response.json()


def over_websocket(client: TestClient, body: str) -> dict[str, Any]:
    with client.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
        ws.receive_text()
        ws.send_text(body)
        frame: dict[str, Any] = json.loads(ws.receive_text())
        return frame


HOSTILE = [
    ("ttl", HUGE, {"outputType": "URL"}),
    ("ttl", HUGE, {"outputType": "URL", "deliveryMethod": "async"}),
    ("ttl", "-" + HUGE, {}),
    ("ttl", HUGE + ".0", {}),
    ("upscaleFactor", HUGE, {}),
    ("outputQuality", HUGE, {}),
    ("inputImage", '"https://example.com/\\ud800.png"', {}),
    ("inputImage", '"\\udfff"', {}),
    ("webhookURL", '"https://example.com/\\ud800"', {}),
    ("uploadEndpoint", '"https://example.com/\\udbff"', {"deliveryMethod": "async"}),
    ("outputFormat", '"\\ud800"', {}),
    ("model", '"\\ud800"', {}),
    ("settings", '{"\\ud800": ["\\udc00"]}', {}),
]


@pytest.mark.parametrize(("field", "literal", "extra"), HOSTILE)
def test_hostile_values_are_a_client_error_on_both_transports(
    client: TestClient, field: str, literal: str, extra: dict[str, Any]
) -> None:
    body = body_with(upscale_task(image(), **extra), field, literal)
    status, reply = rest(client, body)
    assert status < 500, reply
    frame = over_websocket(client, body.replace(json.loads(body)[0]["taskUUID"], upscale_task("")["taskUUID"]))
    for answer in (reply, frame):
        for item in answer.get("errors", []):
            assert item["code"] != "internalServerError", item
    if field != "ttl" or literal.startswith("-"):
        assert status == 400 and "errors" in frame


def test_a_huge_model_name_is_echoed_in_part_and_stored_in_part(client: TestClient) -> None:
    task = upscale_task(image(), model=LONG_MODEL)
    status, reply = rest(client, json.dumps([task]))
    error = reply["errors"][0]
    assert status == 400 and error["code"] == "invalidModel"
    assert len(error["message"]) < ECHO_CHARS + 200 and "..." in error["message"]
    assert len(json.dumps(reply)) < 10_000
    stored = poll(client, task["taskUUID"], KEY)  # a sync task's error is kept for getResponse
    assert stored["code"] == "invalidModel" and len(stored["message"]) < ECHO_CHARS + 200


def test_no_error_message_is_longer_than_the_bound(client: TestClient) -> None:
    task = upscale_task(image(), webhookURL="https://" + "a" * 5000 + ".example/hook")
    reply = client.post("/v1", json=[task], headers=AUTH).json()
    assert all(len(item["message"]) <= MAX_MESSAGE_CHARS + 3 for item in reply.get("errors", []))

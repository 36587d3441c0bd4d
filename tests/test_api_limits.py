"""Each limit gives its own clear Runware error over the API, and nothing already accepted is lost."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api_helpers import JobGate, b64, data_uri, encode, make_client, photo_crop, poll, upscale_task, wait_finished

KEY = "limits-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path, KEY, max_body_bytes=64 * 1024, max_tasks=4, max_input_pixels=100_000) as test_client:
        yield test_client


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge gray image, with a tiny compressed body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_body_over_the_limit_is_413(client: TestClient) -> None:
    big = [upscale_task("A" * 70_000)]
    response = client.post("/v1", content=json.dumps(big), headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413
    error = response.json()["errors"][0]
    assert error["code"] == "payloadTooLarge" and error["max"] == 64 * 1024


def test_too_many_tasks_is_413(client: TestClient) -> None:
    tasks = [{"taskType": "ping", "ping": True}] * 5
    response = client.post("/v1", json=tasks, headers=AUTH)
    assert response.status_code == 413
    assert response.json()["errors"][0]["code"] == "tooManyTasks"
    with client.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
        ws.receive_text()
        ws.send_text(json.dumps(tasks))
        assert json.loads(ws.receive_text())["errors"][0]["code"] == "tooManyTasks"


def test_decompression_bomb_is_refused_from_its_header(client: TestClient) -> None:
    task = upscale_task(b64(bomb_png(20_000, 20_000)))
    response = client.post("/v1", json=[task], headers=AUTH)
    assert response.status_code == 413
    error = response.json()["errors"][0]
    assert error["code"] == "imageTooLarge" and error["parameter"] == "inputImage"
    assert error["taskUUID"] == task["taskUUID"]


def test_full_queue_is_429_and_accepted_tasks_still_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with make_client(tmp_path, KEY, max_queue=1) as client, JobGate(monkeypatch) as gate:
        slow = upscale_task(data_uri(encode(photo_crop(128, 128))), deliveryMethod="async", model=None, upscaleFactor=4)
        assert client.post("/v1", json=[slow], headers=AUTH).status_code == 200
        refused = upscale_task(data_uri(encode(photo_crop())), deliveryMethod="async")
        response = client.post("/v1", json=[refused], headers=AUTH)
        assert response.status_code == 429
        assert response.json()["errors"][0]["code"] == "rateLimitExceeded"
        gate.wait_held()
        assert poll(client, slow["taskUUID"], KEY)["status"] == "processing"
        gate.open()
        assert wait_finished(client, slow["taskUUID"], KEY)["status"] == "success"
        # the refused task was never claimed: its UUID can be sent again now that there is room
        assert client.post("/v1", json=[{**refused, "deliveryMethod": "sync"}], headers=AUTH).status_code == 200


def test_formats_outside_the_allow_list_are_refused(client: TestClient) -> None:
    tiff = io.BytesIO()
    photo_crop().save(tiff, "TIFF")
    response = client.post("/v1", json=[upscale_task(b64(tiff.getvalue()))], headers=AUTH)
    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["code"] == "invalidImage" and "TIFF" in error["message"]

"""Heavy inputs stay off the event loop: every per-byte step of a big request runs in a worker thread.

Asserted structurally, not by timing: the heavy functions are wrapped to record whether they ran on a
thread with a running event loop, and the test checks that none of them did.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import png
import pytest
from fastapi.testclient import TestClient

from tests.api_helpers import make_client, new_uuid, upscale_task
from upscale_server import json_text
from upscale_server.api import context as api_context
from upscale_server.api.preauth import BodyReader
from upscale_server.errors import PayloadTooLargeError
from upscale_server.tasks import images as task_images

KEY = "loop-key"


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ThreadRecorder:
    """Wraps module functions so each call records (name, whether it ran on the event loop's thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, bool]] = []
        self._monkeypatch = monkeypatch

    def wrap(self, module: object, name: str) -> None:
        original: Callable[..., Any] = getattr(module, name)

        @functools.wraps(original)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, on_event_loop()))
            return original(*args, **kwargs)

        self._monkeypatch.setattr(module, name, recorded)

    def names(self) -> set[str]:
        return {name for name, _ in self.calls}

    def on_loop(self) -> list[str]:
        return [name for name, looped in self.calls if looped]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> ThreadRecorder:
    recorder = ThreadRecorder(monkeypatch)
    recorder.wrap(api_context, "parse_request_body")  # JSON parsing of the body or frame
    recorder.wrap(task_images, "classify_image_input")  # data URI handling, base64 validation and decoding
    recorder.wrap(task_images, "decode_image")  # PNG decoding
    return recorder


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path, KEY) as test_client:
        yield test_client


def heavy_png16() -> bytes:
    """A 16-bit RGB PNG of about 1.2 MB (noise does not compress): its base64 makes a body over 1 MB."""
    values = np.random.default_rng(7).integers(0, 65536, (400, 500, 3), dtype=np.uint16)
    out = io.BytesIO()
    png.Writer(500, 400, greyscale=False, bitdepth=16).write(out, values.reshape(400, -1).tolist())
    data = out.getvalue()
    assert len(data) > api_context.LARGE_BODY and len(data) > task_images.LARGE_INPUT
    return data


@pytest.mark.parametrize("form", ["base64", "dataURI"])
def test_rest_upload_of_a_heavy_image_runs_its_byte_work_off_the_loop(
    client: TestClient, recorder: ThreadRecorder, form: str
) -> None:
    encoded = base64.b64encode(heavy_png16()).decode()
    image = encoded if form == "base64" else f"data:image/png;base64,{encoded}"
    task = {"taskType": "imageUpload", "taskUUID": new_uuid(), "image": image}
    response = client.post("/v1", json=[task], headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    assert recorder.names() == {"parse_request_body", "classify_image_input", "decode_image"}
    assert recorder.on_loop() == []


def test_websocket_upscale_of_a_heavy_image_runs_its_byte_work_off_the_loop(
    client: TestClient, recorder: ThreadRecorder
) -> None:
    task = upscale_task(base64.b64encode(heavy_png16()).decode(), upscaleFactor=2)
    with client.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
        assert "data" in json.loads(ws.receive_text())
        recorder.calls.clear()  # the small handshake frame is parsed inline, as it should be
        ws.send_text(json.dumps([task]))
        frame = json.loads(ws.receive_text())
    assert frame["data"][0]["taskUUID"] == task["taskUUID"], frame
    assert {"parse_request_body", "classify_image_input", "decode_image"} <= recorder.names()
    assert recorder.on_loop() == []


def test_small_inputs_are_still_handled_inline(client: TestClient, recorder: ThreadRecorder) -> None:
    """The thresholds only send big work to threads; small requests keep their cheap path."""
    response = client.post("/v1", json=[{"taskType": "ping", "ping": True}], headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert recorder.calls == [("parse_request_body", True)]


async def chunk_stream(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def read_whole(chunks: list[bytes], *, limit: int, declared: int | None = None) -> bytearray:
    """The body as the REST route reads it once its key is accepted."""
    reader = BodyReader(chunk_stream(chunks), declared=declared, limit=limit)
    return asyncio.run(reader.read_until(limit))


def test_a_rest_body_grows_in_one_buffer_not_joined_at_the_end() -> None:
    """Joining a 100 MB body once it has all arrived is a single copy of about 0.1 s on the loop's
    thread; appending each chunk as it comes keeps every step as small as a chunk."""
    chunks = [bytes([i]) * 1000 for i in range(50)]
    body = read_whole(chunks, limit=10**6)
    assert isinstance(body, bytearray) and body == b"".join(chunks)

    with pytest.raises(PayloadTooLargeError):  # refused as it passes the limit, declared or not
        read_whole(chunks, limit=49_999)
    with pytest.raises(PayloadTooLargeError):
        read_whole([], limit=49_999, declared=50_000)


@pytest.mark.parametrize("transport", ["rest", "ws"])
def test_a_big_base64_result_is_written_off_the_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """``json.dumps`` of a reply holding a 35 MB base64 image is about 0.1 s of one C call: the reply's
    text is made in a worker thread, in pieces."""
    recorder = ThreadRecorder(monkeypatch)
    recorder.wrap(json_text, "dump_pieces")
    task = upscale_task(base64.b64encode(heavy_png16()).decode(), upscaleFactor=2, outputType="base64Data")
    if transport == "rest":
        response = client.post("/v1", json=[task], headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200, response.text
        item = response.json()["data"][0]
    else:
        with client.websocket_connect("/v1") as ws:
            ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
            ws.receive_text()
            ws.send_text(json.dumps([task]))
            item = json.loads(ws.receive_text())["data"][0]
    assert len(item["imageBase64Data"]) > json_text.LONG_STRING
    assert "dump_pieces" in recorder.names()
    assert recorder.on_loop() == []

"""Limits that only the real server process (uvicorn) enforces: WebSocket frame size."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import ClientConnection, connect

from tests.api_helpers import data_uri, encode, photo_crop
from upscale_server.testing import UpscaleTestServer


@contextlib.contextmanager
def authenticated(server: UpscaleTestServer) -> Iterator[ClientConnection]:
    with connect(server.ws_url, max_size=None, open_timeout=10) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": server.api_key}]))
        assert "connectionSessionUUID" in ws.recv(timeout=10)
        yield ws


def test_a_fifty_megabyte_frame_is_accepted(live_server: UpscaleTestServer) -> None:
    with authenticated(live_server) as ws:
        image = data_uri(encode(photo_crop()))
        task = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": image, "pad": "A" * (50 * 2**20)}
        ws.send(json.dumps([task]))
        item = json.loads(ws.recv(timeout=60))["data"][0]
        assert item["taskUUID"] == task["taskUUID"] and "imageURL" in item


def test_a_frame_over_the_limit_closes_with_1009(live_server: UpscaleTestServer) -> None:
    with authenticated(live_server) as ws:
        ws.send("[" + " " * (101 * 2**20) + "]")
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_big_text_frames_are_read_as_utf8_json_off_the_loop(live_server: UpscaleTestServer) -> None:
    """Text messages over a megabyte reach the app undecoded (decoding 100 MB on the event loop is a
    stall of its own); the JSON parser reads the UTF-8 itself: non-ASCII text survives, bad JSON is an
    error frame and the connection goes on."""
    with authenticated(live_server) as ws:
        pad = "\u00e9\u2603\U0001f600" * (2**20 // 3)
        ws.send(json.dumps([{"taskType": "ping", "ping": True, "pad": pad}], ensure_ascii=False))
        assert json.loads(ws.recv(timeout=60))["data"][0]["pong"] is True
        ws.send('[{"taskType": "ping", "pad": "' + "a" * 2**21)  # an unterminated string
        error = json.loads(ws.recv(timeout=60))["errors"][0]
        assert error["code"] == "invalidRequest", error
        ws.send(json.dumps([{"taskType": "ping", "ping": True}]))
        assert json.loads(ws.recv(timeout=60))["data"][0]["pong"] is True

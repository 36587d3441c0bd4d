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

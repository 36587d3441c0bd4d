"""While an x4 upscale runs on the CPU, the server keeps answering: pings, uploads, polls, images."""

from __future__ import annotations

import json
import statistics
import time
import uuid

import httpx
from websockets.sync.client import connect

from tests.api_helpers import data_uri, encode, photo_crop
from tests.e2e.conftest import LiveServer


def test_ping_and_rest_are_served_during_an_upscale(live_server: LiveServer, record_property) -> None:
    """Proves the event loop is never blocked by inference: pings and REST calls are answered while the
    task still reports ``processing``. Latency figures are measured by bench/bench_server.py, not here."""
    auth = {"Authorization": f"Bearer {live_server.api_key}"}
    with connect(live_server.ws_url, max_size=None, open_timeout=10) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": live_server.api_key}]))
        assert "connectionSessionUUID" in ws.recv(timeout=10)
        task_uuid = str(uuid.uuid4())
        big = data_uri(encode(photo_crop(160, 160, left=180, top=150)))
        ws.send(
            json.dumps([{"taskType": "imageUpscale", "taskUUID": task_uuid, "inputImage": big, "upscaleFactor": 4}])
        )

        with httpx.Client(base_url=live_server.url, headers=auth, timeout=10) as client:
            poll = [{"taskType": "getResponse", "taskUUID": task_uuid}]
            deadline = time.monotonic() + 60
            while client.post("/v1", json=poll).status_code == 404 and time.monotonic() < deadline:
                time.sleep(0.05)  # the task is claimed once its frame is parsed
            while client.post("/v1", json=poll).json()["data"][0].get("status") != "processing":
                assert time.monotonic() < deadline
                time.sleep(0.05)

            ping_ms: list[float] = []
            rest_ms: list[float] = []
            upload = [
                {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(encode(photo_crop()))}
            ]
            result = None
            while result is None and len(ping_ms) < 400:
                start = time.perf_counter()
                ws.send(json.dumps([{"taskType": "ping", "ping": True}]))
                frame = json.loads(ws.recv(timeout=30))
                if frame.get("data", [{}])[0].get("taskUUID") == task_uuid:
                    result = frame  # the upscale finished; its frame arrived before our pong
                    frame = json.loads(ws.recv(timeout=30))
                else:
                    ping_ms.append((time.perf_counter() - start) * 1000)
                assert frame == {"data": [{"taskType": "ping", "pong": True}]}

                start = time.perf_counter()
                upload[0]["taskUUID"] = str(uuid.uuid4())
                uploaded = client.post("/v1", json=upload)
                assert uploaded.status_code == 200
                assert client.get(uploaded.json()["data"][0]["imageURL"]).status_code == 200
                state = client.post("/v1", json=poll).json()["data"][0]
                rest_ms.append((time.perf_counter() - start) * 1000)
                if state.get("status") == "success" and result is None:
                    result = json.loads(ws.recv(timeout=30))
                time.sleep(0.05)

    assert result is not None and "imageURL" in result["data"][0]
    # Every ping and REST round in these lists completed while the upscale was still running.
    assert len(ping_ms) >= 5 and len(rest_ms) >= 5, "the upscale finished before anything was measured"
    record_property("ping_ms_median", statistics.median(ping_ms))
    record_property("rest_ms_median", statistics.median(rest_ms))

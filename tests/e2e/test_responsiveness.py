"""While an x4 upscale runs on the CPU, the server keeps answering: pings, uploads, polls, images.

The one end-to-end test that runs a real network (``slow``): what it guards against is the load a real
upscale puts on the server process (inference threads that hold the GIL between kernels, an event
loop that waits on them), which a resize does not have. It asserts no number of milliseconds. It
asserts an order and a ratio measured on the same clock: every ping and REST round it counts was sent
after the task was seen ``processing`` and answered before a later ``getResponse`` still said
``processing`` (so it was served while the upscale ran); there were several of each; and none took
more than a quarter of the upscale's own duration (an event loop blocked by inference would make a
request wait for the upscale, so its latency would approach the upscale's duration instead).
Latency figures themselves are measured by bench/bench_server.py, not here.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.api_helpers import data_uri, encode, photo_crop
from tests.e2e.conftest import live_server_at
from upscale_server.testing import UpscaleTestServer

pytestmark = pytest.mark.slow  # the real RealESRGAN_x4plus network on real weights

#: How many pings and REST rounds, at least, must be served while the upscale runs.
MIN_ROUNDS = 5
#: No counted request may take more than this share of the upscale's own duration.
MAX_SHARE_OF_UPSCALE = 0.25
#: Guards against a hang (not measurements): the whole upscale, and one WebSocket answer.
UPSCALE_GUARD_S = 240
RECV_GUARD_S = 60


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory, provisioned_models_dir: Path) -> Iterator[UpscaleTestServer]:
    """A server with the real engine and the converted weights (the default model is loaded before /ready)."""
    with live_server_at(
        tmp_path_factory.mktemp("real-server"),
        models_dir=provisioned_models_dir,
        # One fixed CPU method: this test is about the event loop, not about measuring methods at load.
        env={"UPSCALE_ENGINE": "realesrgan", "UPSCALE_PRECISION": "fp32", "UPSCALE_CPU_CONVOLUTION": "winograd"},
    ) as server:
        yield server


def test_ping_and_rest_are_served_during_an_upscale(
    real_server: UpscaleTestServer, record_property: pytest.RecordProperty
) -> None:
    """Proves the event loop is never held up by inference: pings and REST calls are answered while the task
    still reports ``processing``, each in a small fraction of the time the upscale itself takes."""
    auth = {"Authorization": f"Bearer {real_server.api_key}"}
    with connect(real_server.ws_url, max_size=None, open_timeout=10) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": real_server.api_key}]))
        assert "connectionSessionUUID" in ws.recv(timeout=10)
        task_uuid = str(uuid.uuid4())
        big = data_uri(encode(photo_crop(128, 128, left=180, top=150)))
        submitted = time.perf_counter()
        ws.send(
            json.dumps([{"taskType": "imageUpscale", "taskUUID": task_uuid, "inputImage": big, "upscaleFactor": 4}])
        )

        with httpx.Client(base_url=real_server.url, headers=auth, timeout=RECV_GUARD_S) as client:
            poll = [{"taskType": "getResponse", "taskUUID": task_uuid}]

            def state() -> str | None:
                response = client.post("/v1", json=poll)
                if response.status_code == 404:
                    return None  # not claimed yet: the task is claimed once its frame is parsed
                status: str | None = response.json()["data"][0].get("status")
                return status

            deadline = time.monotonic() + UPSCALE_GUARD_S
            while state() != "processing":
                assert time.monotonic() < deadline, "the task never showed as processing"
                time.sleep(0.05)

            ping_ms: list[float] = []
            rest_ms: list[float] = []
            upload = [
                {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(encode(photo_crop()))}
            ]
            result = None
            finished = 0.0
            while result is None:
                assert time.monotonic() < deadline, f"the upscale did not finish within {UPSCALE_GUARD_S} s"
                start = time.perf_counter()
                ws.send(json.dumps([{"taskType": "ping", "ping": True}]))
                frame = json.loads(ws.recv(timeout=RECV_GUARD_S))
                ping = None
                if frame.get("data", [{}])[0].get("taskUUID") == task_uuid:
                    result, finished = frame, time.perf_counter()  # the upscale's frame came before our pong
                    frame = json.loads(ws.recv(timeout=RECV_GUARD_S))
                else:
                    ping = (time.perf_counter() - start) * 1000
                assert frame == {"data": [{"taskType": "ping", "pong": True}]}

                start = time.perf_counter()
                upload[0]["taskUUID"] = str(uuid.uuid4())
                uploaded = client.post("/v1", json=upload)
                assert uploaded.status_code == 200
                assert client.get(uploaded.json()["data"][0]["imageURL"]).status_code == 200
                rest = (time.perf_counter() - start) * 1000
                now = state()
                if now == "processing" and ping is not None:  # both were served while the upscale still ran
                    ping_ms.append(ping)
                    rest_ms.append(rest)
                elif result is None:
                    assert now == "success", now
                    result, finished = json.loads(ws.recv(timeout=RECV_GUARD_S)), time.perf_counter()
                time.sleep(0.05)

    assert result is not None and result["data"][0]["taskUUID"] == task_uuid and "imageURL" in result["data"][0]
    upscale_ms = (finished - submitted) * 1000
    record_property("upscale_ms", round(upscale_ms))
    assert len(ping_ms) >= MIN_ROUNDS and len(rest_ms) >= MIN_ROUNDS, (
        f"only {len(ping_ms)} pings and {len(rest_ms)} REST rounds were served during a {upscale_ms:.0f} ms upscale"
    )
    record_property("ping_ms_median", statistics.median(ping_ms))
    record_property("rest_ms_median", statistics.median(rest_ms))
    bound = MAX_SHARE_OF_UPSCALE * upscale_ms
    assert max(ping_ms) <= bound, f"a ping waited {max(ping_ms):.0f} ms during a {upscale_ms:.0f} ms upscale"
    assert max(rest_ms) <= bound, f"a REST round took {max(rest_ms):.0f} ms during a {upscale_ms:.0f} ms upscale"

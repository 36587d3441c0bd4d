"""Heavy inputs vs the event loop: the worst WebSocket ping while a huge request is processed, and the
16-bit PNG decode, old (pypng) vs new (libpng via imagecodecs), in the same run.

A live test-target server (resize engine: the network is not what is measured) receives one
``imageUpload`` whose body carries a 16-bit RGB PNG as base64 (about 100 MB for 4096 x 4096), once as a
REST request and once as a WebSocket frame; meanwhile one authenticated WebSocket client pings every
``--interval-ms``. The request comes from another process, so that the pings time the server alone.
Prints one JSON object.

    .venv/bin/python -m bench.bench_loop [--side 4096] [--decode-side 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import png
from websockets.sync.client import connect as ws_connect

from bench import machine
from upscale_server import imaging
from upscale_server.testing import run_test_server

API_KEY = "bench-loop-key"
#: The heavy request, sent by a child process: ``python -c _SEND rest|ws url body-file key`` prints
#: whether it was answered with data.
_SEND = """
import json, sys, httpx
from websockets.sync.client import connect
transport, url, path, key = sys.argv[1:]
with open(path, "rb") as file:
    body = file.read()
if transport == "rest":
    answer = httpx.post(url, content=body, headers={"Authorization": "Bearer " + key,
                        "Content-Type": "application/json"}, timeout=600).json()
else:
    with connect(url, max_size=None, open_timeout=10, compression=None) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": key}]))
        ws.recv(timeout=10)
        ws.send(body.decode())
        answer = json.loads(ws.recv(timeout=600))
print("data" in answer)
"""


def png16(side: int) -> bytes:
    """A 16-bit RGB PNG: smooth ramps plus 10 bits of noise, so it compresses to about 60% (photo-like)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side].astype(np.uint32)
    ramp = ((x * 61 + y * 17) * 8) % 64512
    planes = [(ramp + rng.integers(0, 1024, (side, side), dtype=np.uint32) + 40 * c) % 65536 for c in range(3)]
    values = np.stack(planes, axis=-1).astype(np.uint16)
    return bytes(imagecodecs.png_encode(values, level=1))


def pypng_decode(data: bytes) -> np.ndarray:
    """The previous decoder: pypng (pure Python) rows into a uint16 array."""
    width, height, rows, info = png.Reader(bytes=data).read()
    planes = int(info["planes"])
    values = np.empty((height, width * planes), dtype=np.uint16)
    for y, row in enumerate(rows):
        values[y] = np.frombuffer(row, dtype=np.uint16)
    return values.reshape(height, width, planes)


def decode_speed(side: int) -> dict[str, Any]:
    data = png16(side)
    start = time.perf_counter()
    old = pypng_decode(data)
    old_s = time.perf_counter() - start
    start = time.perf_counter()
    new = imaging._read_png16(data)
    new_s = time.perf_counter() - start
    if not np.array_equal(old, new):
        raise RuntimeError("the decoders disagree")
    return {
        "image": f"{side}x{side} RGB 16-bit, {len(data) / 1e6:.1f} MB",
        "pypng_s": round(old_s, 2),
        "libpng_s": round(new_s, 3),
        "speedup": round(old_s / new_s, 1),
    }


def ping_during_request(transport: str, image: str, interval_s: float) -> dict[str, Any]:
    body = json.dumps([{"taskType": "imageUpload", "taskUUID": "6f1b2c3d-0000-4000-8000-000000000001", "image": image}])
    limit = str(len(body) + 2**20)
    env = {"UPSCALE_ENGINE": "resize", "UPSCALE_MAX_BODY_BYTES": limit, "UPSCALE_MAX_FRAME_BYTES": limit}
    result: dict[str, Any] = {"transport": transport, "body_mb": round(len(body) / 1e6, 1)}
    with (
        tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp,
        run_test_server(data_dir=Path(tmp), api_key=API_KEY, env=env) as server,
    ):
        done = threading.Event()

        body_file = Path(tmp) / "body.json"
        body_file.write_text(body)

        def post() -> None:
            # From another process: a sender thread in this one would hold this process's GIL while
            # it copies the 100 MB body, and the pings would measure this client, not the server.
            try:
                start = time.perf_counter()
                url = server.rest_url if transport == "rest" else server.ws_url
                answered = subprocess.run(
                    [sys.executable, "-c", _SEND, transport, url, str(body_file), API_KEY],
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=True,
                ).stdout
                result["request_s"] = round(time.perf_counter() - start, 2)
                result["answered_with_data"] = answered.strip() == "True"
            finally:
                done.set()

        rtts: list[float] = []
        with ws_connect(server.ws_url, max_size=None, open_timeout=10) as ws:
            ws.send(json.dumps([{"taskType": "authentication", "apiKey": API_KEY}]))
            ws.recv(timeout=10)
            sender = threading.Thread(target=post)
            sender.start()
            while not done.is_set():
                start = time.perf_counter()
                ws.send('[{"taskType": "ping", "ping": true}]')
                ws.recv(timeout=60)
                rtts.append((time.perf_counter() - start) * 1000)
                time.sleep(interval_s)
            sender.join()
    rtts.sort()
    result.update(
        pings=len(rtts),
        ping_max_ms=round(rtts[-1], 1),
        ping_p99_ms=round(rtts[int(0.99 * (len(rtts) - 1))], 1),
        ping_p50_ms=round(rtts[len(rtts) // 2], 1),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=4096, help="side of the PNG in the heavy request")
    parser.add_argument("--decode-side", type=int, default=2048, help="side of the PNG for old vs new decode")
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="requests per transport (the worst ping is noisy)")
    args = parser.parse_args()
    image = base64.b64encode(png16(args.side)).decode()
    runs = [
        ping_during_request(transport, image, args.interval_ms / 1000)
        for _ in range(args.repeats)
        for transport in ("rest", "ws")
    ]
    summary = {
        transport: {
            "worst_ping_ms": [run["ping_max_ms"] for run in runs if run["transport"] == transport],
            "median_worst_ping_ms": statistics.median(
                run["ping_max_ms"] for run in runs if run["transport"] == transport
            ),
        }
        for transport in ("rest", "ws")
    }
    report = {
        "machine": machine.describe(),
        "loop": runs,
        "summary": summary,
        "decode": decode_speed(args.decode_side),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

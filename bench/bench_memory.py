"""Peak memory of one server process under a flood of decoding work, against its memory budget.

Runs the app in this process (resize engine, loopback only: a TestClient) and sends one WebSocket frame
mixing uploads of big PNGs, upscales and 34-byte WEBP header bombs (8192x8192 declared), then reports the
resident-set peak above the idle process next to ``UPSCALE_MEMORY_BUDGET_BYTES``, and how the tasks ended.
Linux only (reads and resets the peak through /proc). The address space is capped (``--cap-gib``) so a
regression fails here instead of taking the machine down::

    .venv/bin/python -m bench.bench_memory --budget-mib 256
    .venv/bin/python -m bench.bench_memory --budget-mib 4096 --no-bombs   # about what no budget would do
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import resource
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _png(side: int) -> bytes:
    y, x = np.mgrid[0:side, 0:side]
    plane = ((x * 7 + y * 3) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([plane, plane.T, plane[::-1]], -1)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _bomb() -> bytes:
    payload = b"\x90\x00\x00\x9d\x01\x2a" + struct.pack("<HH", 8192, 8192) + b"\0" * 4
    body = b"WEBP" + b"VP8 " + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--uploads", type=int, default=8, help="uploads of a 2048x2048 PNG")
    parser.add_argument("--upscales", type=int, default=8, help="upscales by 2 of a 512x512 PNG")
    parser.add_argument("--no-bombs", action="store_true", help="leave out the 32 header bombs")
    parser.add_argument("--cap-gib", type=float, default=12.0, help="address-space cap of this process")
    args = parser.parse_args()
    cap = int(args.cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    from fastapi.testclient import TestClient

    from upscale_server.app import create_app
    from upscale_server.config import Settings

    key = "bench-memory"
    big, small = _png(2048), _png(512)
    tasks: list[dict[str, Any]] = []
    for _ in range(args.uploads):
        tasks.append(
            {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": base64.b64encode(big).decode()}
        )
    for _ in range(args.upscales):
        tasks.append(
            {
                "taskType": "imageUpscale",
                "taskUUID": str(uuid.uuid4()),
                "inputImage": base64.b64encode(small).decode(),
                "upscaleFactor": 2,
                "model": "local:realesr-animevideov3@1",
            }
        )
    if not args.no_bombs:
        bomb = "data:image/webp;base64," + base64.b64encode(_bomb()).decode()
        tasks += [{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": bomb} for _ in range(32)]
    frame = json.dumps(tasks)

    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(
            data_dir=Path(data_dir),
            device="cpu",
            engine="resize",
            preload_default_model=False,
            api_keys=[key],
            memory_budget_bytes=args.budget_mib * 2**20,
        )
        with TestClient(create_app(settings)) as client:
            with client.websocket_connect("/v1") as ws:
                ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": key}]))
                ws.receive_text()
                Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
                idle = _status("VmRSS")
                ws.send_text(frame)
                outcomes: collections.Counter[str] = collections.Counter()
                while sum(outcomes.values()) < len(tasks):
                    reply = json.loads(ws.receive_text())
                    for item in reply.get("data", []):
                        outcomes[f"{item['taskType']} ok"] += 1
                    for item in reply.get("errors", []):
                        outcomes[f"{item['taskType']} {item['code']}"] += 1
            peak = _status("VmHWM") - idle
    print(f"frame: {len(frame) / 2**20:.1f} MiB, {len(tasks)} tasks; budget {args.budget_mib} MiB")
    print(f"idle resident set {idle / 2**20:.0f} MiB; peak above it {peak / 2**20:.0f} MiB")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {count:3d} {outcome}")


if __name__ == "__main__":
    main()

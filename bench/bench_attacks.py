"""Small requests that used to cost much: replays each against a fresh local server and records what it cost.

Each attack runs against its own test-target server (resize engine, loopback only). Meanwhile a watcher
reads the server's resident memory every 10 ms (and kills it past ``--memory-cap-mb``, so that a server
without budgets cannot take the machine down), and a prober asks ``GET /health`` every 100 ms with a
one-second timeout. Per attack: the peak memory, the time until the server had answered or refused
everything, the health probes missed, and what the client saw.

    .venv/bin/python -m bench.bench_attacks [--only NAME ...] [--server-source DIR] [--memory-cap-mb 6000]
        [--memory-budget-mb 2048]

``--server-source`` runs the server from another checkout's ``server/`` folder (an older commit, for a
before/after comparison in one run of this script).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import io
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from websockets.sync.client import connect as ws_connect

from bench import machine
from upscale_server.testing import UpscaleTestServer, run_test_server

KEY = "bench-attacks-key"


def new_uuid() -> str:
    return str(uuid.uuid4())


# --- measuring ------------------------------------------------------------------------------------------


@dataclass
class Watch:
    """Peak resident memory of the server process, and health probes while an attack runs."""

    pid: int
    base_url: str
    cap_bytes: int
    peak_bytes: int = 0
    killed: bool = False
    probes: int = 0
    probes_failed: int = 0
    worst_probe_ms: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _memory(self) -> None:
        while not self._stop.is_set():
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            rss = next((int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("VmRSS")), 0)
            self.peak_bytes = max(self.peak_bytes, rss)
            if rss > self.cap_bytes and not self.killed:
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, 9)
            time.sleep(0.01)

    def _probe(self) -> None:
        with httpx.Client(timeout=1.0) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(f"{self.base_url}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.probes += 1
                self.probes_failed += not ok
                self.worst_probe_ms = max(self.worst_probe_ms, (time.perf_counter() - start) * 1000)
                self._stop.wait(0.1)

    @contextlib.contextmanager
    def running(self) -> Iterator[Watch]:
        threads = [
            threading.Thread(target=self._memory, daemon=True),
            threading.Thread(target=self._probe, daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(timeout=5)


# --- inputs -----------------------------------------------------------------------------------------------


def flat_image(side: int, fmt: str, **save: Any) -> bytes:
    """A one-colour ``side`` x ``side`` image: a few hundred bytes of file for a huge decoded picture."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 200)).save(out, fmt, **save)
    return out.getvalue()


def noise_png(side: int) -> bytes:
    values = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(values).save(out, "PNG", compress_level=1)
    return out.getvalue()


def auth_ws(server: UpscaleTestServer, **kwargs: Any) -> Any:
    ws = ws_connect(server.ws_url, max_size=None, open_timeout=10, **kwargs)
    ws.send(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
    ws.recv(timeout=10)
    return ws


def summarize(items: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        code = item.get("code", "data")
        counts[code] = counts.get(code, 0) + 1
    return counts


def frame_items(text: str | bytes) -> list[dict[str, Any]]:
    frame = json.loads(text)
    return list(frame.get("data", [])) + list(frame.get("errors", []))


# --- attacks ----------------------------------------------------------------------------------------------


def upload_claims(server: UpscaleTestServer) -> dict[str, Any]:
    """32 imageUpload tasks in one WebSocket frame, each a tiny WEBP that decodes to 8192 x 8192."""
    image = base64.b64encode(flat_image(8192, "WEBP", lossless=True)).decode()
    tasks = [{"taskType": "imageUpload", "taskUUID": new_uuid(), "image": image} for _ in range(32)]
    items: list[dict[str, Any]] = []
    with contextlib.suppress(Exception), auth_ws(server) as ws:
        frame = json.dumps(tasks)
        ws.send(frame)
        while len(items) < len(tasks):
            items.extend(frame_items(ws.recv(timeout=120)))
    return {"sent": f"{len(tasks)} tasks in one {len(frame) / 1e3:.1f} KB frame", "answers": summarize(items)}


def big_png_upscales(server: UpscaleTestServer) -> dict[str, Any]:
    """Six concurrent REST upscales of a small 8192 x 8192 PNG."""
    image = base64.b64encode(flat_image(8192, "PNG")).decode()
    results: list[dict[str, Any]] = []

    def one() -> None:
        task = {"taskType": "imageUpscale", "taskUUID": new_uuid(), "inputImage": image, "upscaleFactor": 2}
        with contextlib.suppress(httpx.HTTPError):
            body = httpx.post(server.rest_url, json=[task], headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
            results.extend(body.json().get("data", []) + body.json().get("errors", []))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"sent": f"6 requests of {len(image) / 1e3:.0f} KB", "answers": summarize(results)}


class _GzipBomb(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Encoding", "gzip, gzip")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def gzip_bomb(server: UpscaleTestServer) -> dict[str, Any]:
    """An input URL answering ``Content-Encoding: gzip, gzip``: a few KB that inflate to 1 GiB."""
    zeros = bytes(2**20)
    once = io.BytesIO()
    with gzip.GzipFile(fileobj=once, mode="wb", compresslevel=9) as inner:
        for _ in range(1024):
            inner.write(zeros)
    _GzipBomb.body = gzip.compress(once.getvalue(), compresslevel=9)
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _GzipBomb)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/bomb.png"
        task = {"taskType": "imageUpload", "taskUUID": new_uuid(), "image": url}
        try:
            body = httpx.post(server.rest_url, json=[task], headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
            answers = summarize(body.json().get("data", []) + body.json().get("errors", []))
        except httpx.HTTPError as exc:
            answers = {exc.__class__.__name__: 1}
    finally:
        receiver.shutdown()
    return {"sent": f"{len(_GzipBomb.body) / 1e3:.1f} KB that inflate to 1 GiB", "answers": answers}


def empty_tasks_body(size: int) -> str:
    count = (size - 2) // 3
    return "[" + ",".join(["{}"] * count) + "]"


def ws_deflate_frame(server: UpscaleTestServer) -> dict[str, Any]:
    """No key: one permessage-deflate frame that inflates to 99 MB of ``[{},{},...]``."""
    text = empty_tasks_body(99 * 10**6)
    outcome = "answered"
    try:
        with ws_connect(server.ws_url, max_size=None, open_timeout=10, compression="deflate") as ws:
            ws.send(text)
            reply = ws.recv(timeout=120)
            outcome = f"answered: {summarize(frame_items(reply))}"
    except Exception as exc:
        outcome = f"closed ({exc.__class__.__name__}: {str(exc)[:80]})"
    return {"sent": "99 MB of [{},{},...] deflated on the wire, no key", "answers": outcome}


def rest_body_without_key(server: UpscaleTestServer) -> dict[str, Any]:
    """No key: a 99 MB REST body of ``[{},{},...]``."""
    text = empty_tasks_body(99 * 10**6)
    try:
        response = httpx.post(server.rest_url, content=text.encode(), timeout=120)
        outcome = f"{response.status_code} {summarize(response.json().get('errors', []))}"
    except httpx.HTTPError as exc:
        outcome = f"closed ({exc.__class__.__name__})"
    return {"sent": "99 MB body without a key", "answers": outcome}


def repeated_get_response(server: UpscaleTestServer) -> dict[str, Any]:
    """One 2 KB request with 24 ``getResponse`` items for one finished task with a big base64 result."""
    image = base64.b64encode(noise_png(1024)).decode()
    task_uuid = new_uuid()
    task = {
        "taskType": "imageUpscale",
        "taskUUID": task_uuid,
        "inputImage": image,
        "upscaleFactor": 4,
        "outputType": "base64Data",
        "outputFormat": "PNG",
        "deliveryMethod": "async",
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    httpx.post(server.rest_url, json=[task], headers=headers, timeout=120).raise_for_status()
    poll = [{"taskType": "getResponse", "taskUUID": task_uuid}]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        data = httpx.post(server.rest_url, json=poll, headers=headers, timeout=120).json().get("data", [])
        if data and data[0].get("status") == "success":
            break
        time.sleep(0.2)
    request = json.dumps(poll * 24)
    start = time.perf_counter()
    try:
        response = httpx.post(server.rest_url, content=request.encode(), headers=headers, timeout=120)
        outcome = f"{response.status_code}, {len(response.content) / 1e6:.1f} MB reply"
    except httpx.HTTPError as exc:
        outcome = f"closed ({exc.__class__.__name__})"
    return {
        "sent": f"{len(request) / 1e3:.1f} KB request",
        "answers": outcome,
        "reply_s": round(time.perf_counter() - start, 2),
    }


def endless_headers(server: UpscaleTestServer) -> dict[str, Any]:
    """Headers sent as fast as the server takes them, up to 200 MiB, then one every second for 20 s."""
    port = server.port
    sent = 0
    closed_by_server = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        line = b"X-Filler: " + b"a" * (2**20 - 12) + b"\r\n"
        try:
            while sent < 200 * 2**20:
                conn.sendall(line)
                sent += len(line)
            conn.settimeout(1.0)
            for _ in range(20):
                conn.sendall(b"X-Slow: 1\r\n")
                with contextlib.suppress(TimeoutError):
                    if conn.recv(4096) == b"":
                        closed_by_server = True
                        break
        except OSError:
            closed_by_server = True
    return {"sent": f"{sent / 2**20:.0f} MiB of headers", "answers": "closed" if closed_by_server else "held open"}


class _NeverAnswers:
    """Accepts connections and reads nothing back: a webhook receiver that never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.most_open = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)

    def open_now(self) -> int:
        alive = 0
        for conn in self.connections:
            try:
                conn.setblocking(False)
                alive += conn.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        self.most_open = max(self.most_open, alive)
        return alive

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


def stuck_webhooks(server: UpscaleTestServer, count: int = 300) -> dict[str, Any]:
    """300 small upscales whose webhook goes to a receiver that never answers: how many sockets are held."""
    receiver = _NeverAnswers()
    image = base64.b64encode(flat_image(16, "PNG")).decode()
    url = f"http://127.0.0.1:{receiver.port}/hook"
    task = {"taskType": "imageUpscale", "inputImage": image, "upscaleFactor": 2, "webhookURL": url}
    tasks = [{**task, "taskUUID": new_uuid()} for _ in range(count)]
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        for start in range(0, len(tasks), 50):
            httpx.post(server.rest_url, json=tasks[start : start + 50], headers=headers, timeout=60)
            receiver.open_now()
        for _ in range(20):
            receiver.open_now()
            time.sleep(0.5)
    finally:
        receiver.close()
    return {
        "sent": f"{count} upscales with a webhookURL that never answers",
        "answers": f"{receiver.most_open} sockets open at most",
    }


def detached_sessions(server: UpscaleTestServer) -> dict[str, Any]:
    """50 WebSocket sessions that each start an upscale with a base64 result and leave before it ends."""
    image = base64.b64encode(noise_png(512)).decode()
    for _ in range(50):
        with auth_ws(server) as ws:
            ws.send(
                json.dumps(
                    [
                        {
                            "taskType": "imageUpscale",
                            "taskUUID": new_uuid(),
                            "inputImage": image,
                            "upscaleFactor": 4,
                            "outputType": "base64Data",
                            "outputFormat": "PNG",
                        }
                    ]
                )
            )
    time.sleep(15)  # the upscales finish while nobody listens
    return {"sent": "50 sessions left with an upscale running", "answers": "results buffered for absent clients"}


def many_scans(server: UpscaleTestServer) -> dict[str, Any]:
    """A progressive JPEG whose smallest scan is repeated 5,000 times: each scan is a pass over the picture."""
    out = io.BytesIO()
    Image.new("RGB", (2048, 2048), (120, 130, 140)).save(out, "JPEG", progressive=True, quality=90)
    data = out.getvalue()
    first, end = data.index(b"\xff\xda"), data.rindex(b"\xff\xd9")
    starts = [first, *(i for i in range(first + 2, end) if data[i : i + 2] == b"\xff\xda")]
    smallest = min((data[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)), key=len)
    jpeg = data[:end] + smallest * 5000 + data[end:]
    task = {"taskType": "imageUpload", "taskUUID": new_uuid(), "image": base64.b64encode(jpeg).decode()}
    try:
        body = httpx.post(server.rest_url, json=[task], headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
        answers: Any = summarize(body.json().get("data", []) + body.json().get("errors", []))
    except httpx.HTTPError as exc:
        answers = {exc.__class__.__name__: 1}
    return {"sent": f"a {len(jpeg) / 1e3:.0f} KB JPEG of 5,000 scans, 2048 x 2048", "answers": answers}


ATTACKS: dict[str, Callable[[UpscaleTestServer], dict[str, Any]]] = {
    "upload_claims": upload_claims,
    "big_png_upscales": big_png_upscales,
    "gzip_bomb": gzip_bomb,
    "ws_deflate_frame": ws_deflate_frame,
    "rest_body_without_key": rest_body_without_key,
    "repeated_get_response": repeated_get_response,
    "endless_headers": endless_headers,
    "stuck_webhooks": stuck_webhooks,
    "detached_sessions": detached_sessions,
    "many_scans": many_scans,
}


def run_attack(name: str, source: Path | None, cap_bytes: int, budget_bytes: int) -> dict[str, Any]:
    env = {
        "UPSCALE_OUTBOUND_ALLOW": '["127.0.0.1"]',
        "UPSCALE_WEBHOOK_GIVE_UP_AFTER": "15",
        "UPSCALE_MEMORY_BUDGET_BYTES": str(budget_bytes),  # a server from before budgets ignores it
    }
    if source is not None:
        env["PYTHONPATH"] = str(source)
    with (
        tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp,
        run_test_server(data_dir=Path(tmp), api_key=KEY, env=env) as server,
    ):
        baseline = int(
            next(
                line for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines() if "VmRSS" in line
            ).split()[1]
        )
        watch = Watch(server.process.pid, server.url, cap_bytes)
        start = time.perf_counter()
        with watch.running():
            try:
                seen = ATTACKS[name](server)
            except Exception as exc:  # the attack's client failing is an outcome, not a bench error
                seen = {"answers": f"client error: {exc.__class__.__name__}: {str(exc)[:100]}"}
        seconds = time.perf_counter() - start
        alive = server.process.poll() is None
    return {
        "attack": name,
        **seen,
        "peak_mb": round(watch.peak_bytes / 2**20),
        "idle_mb": round(baseline / 1024),
        "killed_at_cap": watch.killed,
        "server_alive": alive,
        "seconds": round(seconds, 1),
        "health_probes_failed": f"{watch.probes_failed}/{watch.probes}",
        "worst_probe_ms": round(watch.worst_probe_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(ATTACKS), help="attacks to run (default: all)")
    parser.add_argument("--server-source", type=Path, help="run the server from this checkout's server/ folder")
    parser.add_argument("--memory-cap-mb", type=int, default=6000, help="kill the server past this resident size")
    parser.add_argument("--memory-budget-mb", type=int, default=2048, help="the server's UPSCALE_MEMORY_BUDGET_BYTES")
    args = parser.parse_args()
    source = args.server_source.resolve() if args.server_source else None
    rows = []
    for name in args.only or ATTACKS:
        rows.append(run_attack(name, source, args.memory_cap_mb * 2**20, args.memory_budget_mb * 2**20))
        print(json.dumps(rows[-1]), flush=True)
    described = machine.describe()
    settings = {"memory_cap_mb": args.memory_cap_mb, "memory_budget_mb": args.memory_budget_mb}
    report = {"machine": described, "server_source": str(source or "this checkout"), **settings, "attacks": rows}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

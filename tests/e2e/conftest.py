"""A real server: ``upscale-server serve`` in its own process on a free 127.0.0.1 port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODELS


@dataclass(frozen=True)
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    ws_url: str  # ws://127.0.0.1:PORT/v1
    api_key: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(data_dir: Path, *, api_key: str = "test-key", env: dict[str, str] | None = None) -> LiveServer:
    port = free_port()
    log_path = data_dir / "server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "upscale_server", "serve", "--port", str(port), "--data-dir", str(data_dir),
        "--models-dir", str(MODELS), "--device", "cpu", "--api-key", api_key,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        # Test fixtures (and the server's own image URLs, used as inputs) live on 127.0.0.1.
        environment = {**os.environ, "UPSCALE_OUTBOUND_ALLOW": '["127.0.0.1"]', **(env or {})}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    server = LiveServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1", api_key, data_dir, process, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            httpx.post(f"{server.url}/v1", json=[{"taskType": "ping", "ping": True}], timeout=1)
            return server
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not start:\n{server.log()}")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("live-server"))
    yield server
    stop_server(server)

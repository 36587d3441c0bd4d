"""Connection bounds that only the real server process holds: frames before authentication (inflated
size included), head size and timeout, WebSocket timeouts and the connection cap."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.e2e.conftest import live_server_at
from upscale_server.testing import UpscaleTestServer

SMALL = 4096
FRAME = 1 << 20
BOUNDS = {
    "UPSCALE_MAX_UNAUTHENTICATED_BYTES": str(SMALL),
    "UPSCALE_MAX_FRAME_BYTES": str(FRAME),
    "UPSCALE_HEADER_TIMEOUT_SECONDS": "1",
    "UPSCALE_MAX_HEADER_BYTES": "8192",
    "UPSCALE_WS_AUTH_TIMEOUT_SECONDS": "2",
    "UPSCALE_WS_IDLE_TIMEOUT_SECONDS": "2",
    "UPSCALE_MAX_CONNECTIONS": "6",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpscaleTestServer]:
    with live_server_at(tmp_path_factory.mktemp("bounds"), env=BOUNDS) as live:
        yield live


def peak_rss(server: UpscaleTestServer) -> int:
    """The server process's peak resident memory in bytes (Linux)."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def close_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=10)
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


def authenticate(ws: ClientConnection, key: str) -> None:
    ws.send(json.dumps([{"taskType": "authentication", "apiKey": key}]))
    assert "connectionSessionUUID" in ws.recv(timeout=10)


def test_a_big_frame_before_authentication_closes_with_1009(server: UpscaleTestServer) -> None:
    with connect(server.ws_url, compression=None, open_timeout=10) as ws:
        ws.send("[" + " " * (2 * SMALL) + "]")
        assert close_code(ws) == 1009


def tiny_tasks(size: int) -> str:
    return "[" + "{}," * (size // 3) + "{}]"


@pytest.mark.parametrize("authenticated", [False, True])
def test_a_deflate_bomb_is_bounded_after_inflation(server: UpscaleTestServer, authenticated: bool) -> None:
    """64 MB of ``[{},{},...]`` deflate to about 64 KB; the server stops inflating at its limit."""
    bomb = tiny_tasks(64 << 20)
    before = peak_rss(server)
    with connect(server.ws_url, open_timeout=10, max_size=None) as ws:
        assert ws.protocol.extensions, "the client negotiated no compression"
        if authenticated:
            authenticate(ws, server.api_key)
        ws.send(bomb)
        assert close_code(ws) == 1009
    assert peak_rss(server) - before < 32 << 20


def test_authentication_lifts_the_frame_limit(server: UpscaleTestServer) -> None:
    with connect(server.ws_url, compression=None, open_timeout=10) as ws:
        authenticate(ws, server.api_key)
        ws.send(json.dumps([{"taskType": "ping", "ping": True, "pad": "x" * (FRAME // 2)}]))
        assert json.loads(ws.recv(timeout=10))["data"][0]["pong"] is True


def test_a_connection_that_never_authenticates_is_closed(server: UpscaleTestServer) -> None:
    with connect(server.ws_url, open_timeout=10) as ws:
        ws.send(json.dumps([{"taskType": "ping", "ping": True}]))  # pings do not count as authenticating
        assert json.loads(ws.recv(timeout=10))["data"][0]["pong"] is True
        error = json.loads(ws.recv(timeout=10))["errors"][0]
        assert error["code"] == "missingApiKey" and error["taskType"] == "authentication"
        assert close_code(ws) == 1008


def test_an_idle_connection_is_closed_and_its_session_resumes(server: UpscaleTestServer) -> None:
    with connect(server.ws_url, open_timeout=10) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": server.api_key}]))
        session = json.loads(ws.recv(timeout=10))["data"][0]["connectionSessionUUID"]
        started = time.monotonic()
        assert close_code(ws) == 1001
        assert time.monotonic() - started >= 1.5
    with connect(server.ws_url, open_timeout=10) as ws:
        auth = {"taskType": "authentication", "apiKey": server.api_key, "connectionSessionUUID": session}
        ws.send(json.dumps([auth]))
        assert json.loads(ws.recv(timeout=10))["data"][0]["connectionSessionUUID"] == session


def raw_connection(server: UpscaleTestServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def get_health(sock: socket.socket) -> bytes:
    """One ``GET /health`` on ``sock``: the status line of its response, read whole."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head.split(b"\r\n")[0]


def test_a_trickled_request_head_is_cut_off(server: UpscaleTestServer) -> None:
    with raw_connection(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        for _ in range(5):
            with contextlib.suppress(OSError):
                sock.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.3)
        assert sock.recv(1024) == b""  # closed, no response
        assert 0.8 < time.monotonic() - started < 5


def test_a_trickled_body_without_a_key_is_refused(server: UpscaleTestServer) -> None:
    with raw_connection(server) as sock:
        sock.sendall(b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n[")  # and no more
        started = time.monotonic()
        answer = b""
        while b"requestTimeout" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"requestTimeout" in answer
        assert time.monotonic() - started < 5


def test_a_silent_connection_is_cut_off(server: UpscaleTestServer) -> None:
    with raw_connection(server) as sock:
        started = time.monotonic()
        assert sock.recv(1024) == b""
        assert time.monotonic() - started < 5


def test_an_oversized_request_head_is_refused(server: UpscaleTestServer) -> None:
    with raw_connection(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 16384)
        time.sleep(0.2)  # the head is judged while incomplete (one read may complete a bigger one)
        with contextlib.suppress(OSError):
            sock.sendall(b"a" * 16384 + b"\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 400")


def test_keep_alive_requests_still_work(server: UpscaleTestServer) -> None:
    with raw_connection(server) as sock:
        for _ in range(2):
            assert get_health(sock).startswith(b"HTTP/1.1 200")
            time.sleep(1.5)  # longer than the head timeout, shorter than keep-alive's 5 s


def test_connections_past_the_cap_are_refused(server: UpscaleTestServer) -> None:
    with contextlib.ExitStack() as stack:
        holders = [stack.enter_context(connect(server.ws_url, open_timeout=10)) for _ in range(6)]
        for ws in holders:
            ws.send(json.dumps([{"taskType": "authentication", "apiKey": server.api_key}]))
            ws.recv(timeout=10)
        with pytest.raises(InvalidStatus) as refused:
            connect(server.ws_url, open_timeout=10)
        assert refused.value.response.status_code == 503
        with raw_connection(server) as sock:
            assert get_health(sock).startswith(b"HTTP/1.1 503")
    with raw_connection(server) as sock:  # room again once they are gone
        time.sleep(0.2)
        assert get_health(sock).startswith(b"HTTP/1.1 200")

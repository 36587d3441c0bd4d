"""Authenticate before spending: a body is read, counted and parsed only as far as its key allows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.api_helpers import JobGate, data_uri, encode, make_client, photo_crop, upscale_task
from upscale_server.api.auth import ApiKeys
from upscale_server.api.preauth import leading_api_key, read_authenticated_body
from upscale_server.api.shape import VALUES_PER_TASK, check_shape
from upscale_server.errors import (
    InvalidApiKeyError,
    MissingApiKeyError,
    PayloadTooLargeError,
    RequestTimeoutError,
    TooManyTasksError,
)

KEY = "admission-key"
AUTH = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
SMALL = 4096  # the unauthenticated prefix in these tests
PING = {"taskType": "ping", "ping": True}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path, KEY, max_unauthenticated_bytes=SMALL, max_tasks=4) as test_client:
        yield test_client


def padded_pings(*, auth: str | None = None, size: int = 3 * SMALL) -> str:
    """A task array bigger than the unauthenticated prefix: pings with a long unknown field."""
    tasks: list[dict[str, object]] = [{**PING, "pad": "x" * size}]
    if auth is not None:
        tasks.insert(0, {"taskType": "authentication", "apiKey": auth})
    return json.dumps(tasks)


class CountingStream:
    """A body delivered in chunks; counts how many were taken."""

    def __init__(self, body: bytes, chunk: int = 1024) -> None:
        self.chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
        self.taken = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.chunks:
            self.taken += 1
            yield piece


def read(chunks: AsyncIterator[bytes], *, bearer: str | None, timeout: float = 10) -> bytes:
    return asyncio.run(
        read_authenticated_body(
            chunks,
            ApiKeys([KEY]),
            bearer=bearer,
            declared=None,
            max_body_bytes=1 << 20,
            max_unauthenticated_bytes=SMALL,
            unauthenticated_timeout=timeout,
        )
    )


@pytest.mark.parametrize(("bearer", "error"), [(None, MissingApiKeyError), ("wrong", InvalidApiKeyError)])
def test_a_big_body_without_an_accepted_key_is_refused_after_its_prefix(bearer: str | None, error: type) -> None:
    stream = CountingStream(padded_pings(size=200_000).encode())
    with pytest.raises(error):
        read(aiter(stream), bearer=bearer)
    assert stream.taken <= SMALL // 1024 + 1 < len(stream.chunks)


@pytest.mark.parametrize(("bearer", "auth"), [(KEY, None), (None, KEY), ("wrong", KEY)])
def test_a_big_body_with_an_accepted_key_is_read_whole(bearer: str | None, auth: str | None) -> None:
    body = padded_pings(auth=auth, size=200_000).encode()
    assert read(aiter(CountingStream(body)), bearer=bearer) == body


def test_a_trickled_body_prefix_times_out() -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b"["
        await asyncio.sleep(5)
        yield b"]"

    with pytest.raises(RequestTimeoutError) as refused:
        read(trickle(), bearer=KEY, timeout=0.1)
    assert refused.value.http_status == 408 and refused.value.code == "requestTimeout"


def test_the_leading_authentication_task_decides_over_the_header() -> None:
    with pytest.raises(InvalidApiKeyError):
        read(aiter(CountingStream(padded_pings(auth="wrong", size=200_000).encode())), bearer=KEY)


@pytest.mark.parametrize(
    ("prefix", "key"),
    [
        (b' [ {"taskType": "authentication", "apiKey": "k"}, {"taskType": "ping"', "k"),
        (b'[{"apiKey": "k", "taskType": "authentication"', None),  # not complete within the prefix
        (b'[{"taskType": "ping"}, {"taskType": "authentication", "apiKey": "k"}]', None),  # not leading
        (b'[{"taskType": "authentication", "apiKey": 5}]', None),
        (b'{"taskType": "authentication", "apiKey": "k"}', None),  # not an array
        (b'[{"taskType": "authentication", "apiKey": "k\\u00e9"}, "\xc3', "k\u00e9"),  # cut inside a character
    ],
)
def test_leading_api_key(prefix: bytes, key: str | None) -> None:
    assert leading_api_key(prefix) == key


def test_big_rest_bodies_need_an_accepted_key_first(client: TestClient) -> None:
    refused = client.post("/v1", content=padded_pings(), headers={"content-type": "application/json"})
    assert refused.status_code == 401 and refused.json()["errors"][0]["code"] == "missingApiKey"
    wrong = client.post("/v1", content=padded_pings(), headers={**AUTH, "Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and wrong.json()["errors"][0]["code"] == "invalidApiKey"
    for body, headers in ((padded_pings(), AUTH), (padded_pings(auth=KEY), {"content-type": "application/json"})):
        response = client.post("/v1", content=body, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["data"][0]["taskType"] == "ping"


def test_small_bodies_still_authenticate_in_the_body(client: TestClient) -> None:
    response = client.post("/v1", json=[{"taskType": "authentication", "apiKey": KEY}, PING])
    assert response.status_code == 200 and response.json()["data"][0]["pong"] is True


@contextlib.contextmanager
def allocates_under(limit: int) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < limit, peak


def test_millions_of_tiny_tasks_are_refused_before_they_are_built() -> None:
    body = b"[" + b"{}," * 2_000_000 + b"{}]"  # 6 MB: json.loads would build two million dicts
    with pytest.raises(TooManyTasksError) as refused, allocates_under(64 * 1024):
        check_shape(body, max_tasks=64)
    assert refused.value.max == 64


def test_millions_of_values_inside_one_task_are_refused_before_they_are_built() -> None:
    body = json.dumps([{"taskType": "ping", "junk": [[]] * 1_000_000}])
    with pytest.raises(PayloadTooLargeError), allocates_under(64 * 1024):
        check_shape(body, max_tasks=4)


def test_real_bodies_pass_the_shape_check() -> None:
    image = "A" * 3_000_000  # a long string is skipped, not walked
    tasks = [{"taskType": "imageUpscale", "inputImage": image, "note": 'a "quoted" \\ [text]'}] * 4
    check_shape(json.dumps(tasks), max_tasks=4)
    check_shape(json.dumps(tasks).encode(), max_tasks=4)
    check_shape(json.dumps([{"values": list(range(VALUES_PER_TASK - 10))}]), max_tasks=1)


def test_too_many_tasks_is_counted_before_parsing_on_both_transports(client: TestClient) -> None:
    body = "[" + "{}," * 100_000 + "{}]"
    response = client.post("/v1", content=body, headers=AUTH)
    assert response.status_code == 413 and response.json()["errors"][0]["code"] == "tooManyTasks"
    with client.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
        ws.receive_text()
        ws.send_text("[" + "{}," * 1000 + "{}]")
        assert json.loads(ws.receive_text())["errors"][0]["code"] == "tooManyTasks"


def test_a_big_frame_before_authentication_is_refused_and_closes(client: TestClient) -> None:
    with client.websocket_connect("/v1") as ws:
        ws.send_text(padded_pings(auth=KEY))  # even one that would authenticate: it is too big to read first
        error = json.loads(ws.receive_text())["errors"][0]
        assert error["code"] == "payloadTooLarge" and error["max"] == SMALL
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 1009


def test_after_authentication_big_frames_are_read(client: TestClient) -> None:
    with client.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
        ws.receive_text()
        ws.send_text(padded_pings())
        assert json.loads(ws.receive_text())["data"][0]["pong"] is True


def test_websocket_timeouts(tmp_path: Path) -> None:
    with make_client(tmp_path, KEY, ws_auth_timeout_seconds=0.3, ws_idle_timeout_seconds=0.3) as client:
        with client.websocket_connect("/v1") as ws:
            error = json.loads(ws.receive_text())["errors"][0]
            assert error["code"] == "missingApiKey" and "0.3 s" in error["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
            assert closed.value.code == 1008
        with client.websocket_connect("/v1") as ws:
            ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
            ws.receive_text()
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
            assert closed.value.code == 1001


@pytest.mark.local_only  # in a cluster the worker's job is not the connection's own request (docs/operations.md)
def test_a_connection_waiting_for_its_own_request_is_not_idle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (
        make_client(tmp_path, KEY, ws_idle_timeout_seconds=0.2) as client,
        JobGate(monkeypatch) as gate,
        client.websocket_connect("/v1") as ws,
    ):
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
        ws.receive_text()
        task = upscale_task(data_uri(encode(photo_crop())))
        ws.send_text(json.dumps([task]))
        gate.wait_held()
        time.sleep(0.6)  # three idle timeouts while the upscale runs
        gate.open()
        assert json.loads(ws.receive_text())["data"][0]["taskUUID"] == task["taskUUID"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 1001

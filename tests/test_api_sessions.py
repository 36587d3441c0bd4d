"""WebSocket sessions outlive their connection: a reconnect with the same UUID gets what it missed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api_helpers import (
    JobGate,
    api_client,
    data_uri,
    encode,
    photo_crop,
    poll,
    resize_settings,
    upscale_task,
    wait_finished,
)
from upscale_server.sessions.local import LocalSessionStore

KEY = "session-key"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with api_client(resize_settings(tmp_path, api_keys=[KEY])) as test_client:
        yield test_client


def auth(ws: Any, session: str | None = None) -> str:
    task: dict[str, Any] = {"taskType": "authentication", "apiKey": KEY}
    if session:
        task["connectionSessionUUID"] = session
    ws.send_text(json.dumps([task]))
    return str(json.loads(ws.receive_text())["data"][0]["connectionSessionUUID"])


def test_results_that_finish_while_away_are_delivered_on_reconnect(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = upscale_task(data_uri(encode(photo_crop(96, 96))), model=None, upscaleFactor=4)
    with JobGate(monkeypatch) as gate:
        with client.websocket_connect("/v1") as ws:
            session = auth(ws)
            ws.send_text(json.dumps([task]))
            gate.wait_held()  # claimed and running: now the client leaves
            assert poll(client, task["taskUUID"], KEY)["status"] == "processing"
        gate.open()  # the result arrives while nobody is attached
        assert wait_finished(client, task["taskUUID"], KEY)["status"] == "success"
    with client.websocket_connect("/v1") as ws:
        assert auth(ws, session) == session
        frame = json.loads(ws.receive_text())
        assert frame["data"][0]["taskUUID"] == task["taskUUID"] and "imageURL" in frame["data"][0]


def test_resent_in_flight_async_task_is_a_conflict_and_still_pollable(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = upscale_task(data_uri(encode(photo_crop(64, 64))), deliveryMethod="async", model=None)
    with JobGate(monkeypatch) as gate:
        with client.websocket_connect("/v1") as ws:
            auth(ws)
            ws.send_text(json.dumps([task]))
            ack = {"data": [{"taskType": "imageUpscale", "taskUUID": task["taskUUID"]}]}
            assert json.loads(ws.receive_text()) == ack
            gate.wait_held()  # provably still in flight when it is sent again
            ws.send_text(json.dumps([task]))
            error = json.loads(ws.receive_text())["errors"][0]
            assert error["code"] == "conflictTaskUUID" and error["taskUUID"] == task["taskUUID"]
            assert poll(client, task["taskUUID"], KEY)["status"] == "processing"
        gate.open()
        assert wait_finished(client, task["taskUUID"], KEY)["status"] == "success"


def test_detached_sessions_expire_after_the_resume_window() -> None:
    now = [0.0]
    registry = LocalSessionStore(resume_seconds=120, clock=lambda: now[0])
    session = asyncio.run(registry.open(None))

    async def sender(frame: str) -> None:
        raise AssertionError("detached: nothing is sent")

    async def scenario() -> None:
        await session.attach(sender)
        await session.detach(sender)
        await session.deliver({"data": [{"taskUUID": "t"}]})  # buffered

    asyncio.run(scenario())
    now[0] = 119.0
    assert asyncio.run(registry.open(session.uuid)) is session
    now[0] = 121.0
    assert registry.expire() == 1
    assert asyncio.run(registry.open(session.uuid)) is not session  # a fresh session under the same id


async def _refusing_sender(frame: str) -> None:
    raise AssertionError("detached: nothing is sent")


def _detached_session(store: LocalSessionStore) -> Any:
    async def scenario() -> Any:
        session = await store.open(None)
        await session.attach(_refusing_sender)
        await session.detach(_refusing_sender)
        return session

    return asyncio.run(scenario())


def _frame(task: str, size: int) -> dict[str, Any]:
    return {"data": [{"taskUUID": task, "imageBase64Data": "A" * size}]}


def test_a_detached_session_keeps_at_most_buffer_bytes_dropping_the_oldest_frames() -> None:
    store = LocalSessionStore(resume_seconds=120, buffer_bytes=2500, clock=lambda: 0.0)
    session = _detached_session(store)

    async def scenario() -> list[str]:
        for task in ("t1", "t2", "t3"):
            await session.deliver(_frame(task, 1000))
        assert session.buffered_frames == 2 and session.dropped == 1
        assert session.buffered_bytes == sum(
            len(json.dumps(_frame(t, 1000), separators=(",", ":"))) for t in ("t2", "t3")
        )
        assert session.buffered_bytes <= 2500
        received: list[str] = []

        async def sender(frame: str) -> None:
            received.append(json.loads(frame)["data"][0]["taskUUID"])

        await session.attach(sender)
        return received

    # The reconnecting client misses the oldest frame (t1 stays pollable with getResponse).
    assert asyncio.run(scenario()) == ["t2", "t3"]
    assert session.buffered_frames == 0 and session.buffered_bytes == 0


def test_all_detached_sessions_together_keep_at_most_total_bytes() -> None:
    """Fifty absent clients must not hold fifty times the per-session bound: the store's total bound drops
    the oldest frames of the session at hand, and what is forgotten or sent gives its room back."""
    store = LocalSessionStore(resume_seconds=120, buffer_bytes=10_000, total_bytes=3500, clock=lambda: 0.0)
    first, second = _detached_session(store), _detached_session(store)

    async def scenario() -> None:
        for task in ("a1", "a2", "a3"):
            await first.deliver(_frame(task, 1000))
        assert first.buffered_frames == 3 and store.pool.used == first.buffered_bytes
        await second.deliver(_frame("b1", 1000))  # over the total: the session at hand loses its oldest
        assert second.buffered_frames == 0 and second.dropped == 1
        assert store.pool.used <= 3500
        first.forget()  # an expired session gives its room back
        assert store.pool.used == 0
        await second.deliver(_frame("b2", 1000))
        assert second.buffered_frames == 1 and store.pool.used == second.buffered_bytes

        async def sender(frame: str) -> None:
            pass

        await second.attach(sender)
        assert store.pool.used == 0

    asyncio.run(scenario())


def test_a_frame_bigger_than_the_whole_bound_is_not_kept() -> None:
    store = LocalSessionStore(resume_seconds=120, buffer_bytes=1024, clock=lambda: 0.0)
    session = _detached_session(store)

    async def scenario() -> None:
        await session.deliver(_frame("small", 10))
        await session.deliver(_frame("huge", 5000))

    asyncio.run(scenario())
    assert session.buffered_frames == 0 and session.buffered_bytes == 0 and session.dropped == 2


def test_an_expired_session_frees_its_frames_and_keeps_no_new_ones() -> None:
    now = [0.0]
    store = LocalSessionStore(resume_seconds=10, clock=lambda: now[0])
    session = _detached_session(store)
    asyncio.run(session.deliver(_frame("t1", 100)))
    assert session.buffered_frames == 1
    now[0] = 11.0
    assert store.expire() == 1 and len(store) == 0
    assert session.expired and session.buffered_frames == 0 and session.buffered_bytes == 0
    asyncio.run(session.deliver(_frame("t2", 100)))  # a task of the gone session finishes late
    assert session.buffered_frames == 0


def test_detached_sessions_expire_on_a_schedule_without_any_reconnect() -> None:
    now = [0.0]
    stop = asyncio.Event()

    class Recording(LocalSessionStore):
        passes = 0
        counting = False  # open() expires too: count only the scheduled checks

        def expire(self) -> int:
            removed = super().expire()
            if not self.counting:
                return removed
            self.passes += 1
            if self.passes == 1:
                now[0] = 25.0  # the second session's window passes before the next check
            else:
                stop.set()
            return removed

    store = Recording(resume_seconds=10, clock=lambda: now[0])
    first = _detached_session(store)
    now[0] = 11.0  # the first session's window has passed: the first check drops it
    second = _detached_session(store)

    store.counting = True

    async def scenario() -> None:
        await asyncio.wait_for(store.expire_forever(stop=stop, interval=0.001), timeout=30)

    asyncio.run(scenario())
    assert first.expired and second.expired and len(store) == 0 and store.passes == 2


def test_the_check_interval_follows_the_resume_window_within_bounds() -> None:
    assert LocalSessionStore(resume_seconds=120).check_interval == 30.0
    assert LocalSessionStore(resume_seconds=20).check_interval == 5.0
    assert LocalSessionStore(resume_seconds=0).check_interval == 1.0


def test_the_app_expires_sessions_for_its_whole_lifespan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = resize_settings(tmp_path, api_keys=[KEY], session_buffer_bytes=4096)
    if settings.redis_url:
        pytest.skip("cluster sessions live in Redis, with its own expiry")
    seen: list[tuple[str, Any]] = []

    async def expire_forever(self: LocalSessionStore, *, stop: asyncio.Event, interval: float | None = None) -> None:
        seen.append(("started", self.buffer_bytes))
        await stop.wait()
        seen.append(("stopped", None))

    monkeypatch.setattr(LocalSessionStore, "expire_forever", expire_forever)
    from upscale_server.app import create_app

    with TestClient(create_app(settings)):
        assert seen == [("started", 4096)]
    assert seen == [("started", 4096), ("stopped", None)]

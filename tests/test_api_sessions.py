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

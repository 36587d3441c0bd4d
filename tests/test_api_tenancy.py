"""API keys separate clients: a task, its result and a WebSocket session are found only with the key
that created them; open mode is one tenant."""

from __future__ import annotations

import contextlib
import json
import sqlite3
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
    new_uuid,
    photo_crop,
    poll,
    resize_settings,
    upscale_task,
    wait_finished,
)
from upscale_server.api.auth import owner_of
from upscale_server.backends import DATABASE_NAME

ALICE, BOB = "alice-key", "bob-key"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with api_client(resize_settings(tmp_path, api_keys=[ALICE, BOB])) as test_client:
        yield test_client


def upload(client: TestClient, key: str, task_uuid: str | None = None) -> dict[str, Any]:
    task = {"taskType": "imageUpload", "taskUUID": task_uuid or new_uuid(), "image": data_uri(encode(photo_crop()))}
    response = client.post("/v1", json=[task], headers={"Authorization": f"Bearer {key}"})
    body: dict[str, Any] = response.json()
    return body


def auth(ws: Any, key: str, session: str | None = None) -> str:
    task: dict[str, Any] = {"taskType": "authentication", "apiKey": key}
    if session:
        task["connectionSessionUUID"] = session
    ws.send_text(json.dumps([task]))
    return str(json.loads(ws.receive_text())["data"][0]["connectionSessionUUID"])


def poll_reply(client: TestClient, task_uuid: str, key: str) -> tuple[int, dict[str, Any]]:
    """The status and the error item of a ``getResponse`` that fails."""
    task = {"taskType": "getResponse", "taskUUID": task_uuid}
    response = client.post("/v1", json=[task], headers={"Authorization": f"Bearer {key}"})
    return response.status_code, response.json()["errors"][0]


def test_another_keys_task_is_not_found_exactly_like_an_unknown_one(client: TestClient) -> None:
    task_uuid = upload(client, ALICE)["data"][0]["taskUUID"]
    assert poll(client, task_uuid, ALICE)["status"] == "success"
    status, foreign = poll_reply(client, task_uuid, BOB)
    unknown_uuid = new_uuid()
    assert poll_reply(client, unknown_uuid, BOB)[0] == status == 404
    unknown = poll_reply(client, unknown_uuid, BOB)[1]
    assert foreign["code"] == unknown["code"] == "taskNotFound"
    assert foreign["message"].replace(task_uuid, "X") == unknown["message"].replace(unknown_uuid, "X")
    assert set(foreign) == set(unknown)


def test_another_keys_task_uuid_is_a_conflict_that_reveals_nothing_else(client: TestClient) -> None:
    """taskUUIDs are one namespace per server: reusing one answers conflictTaskUUID, never its task."""
    task_uuid = upload(client, ALICE)["data"][0]["taskUUID"]
    error = upload(client, BOB, task_uuid)["errors"][0]
    assert error["code"] == "conflictTaskUUID" and "imageUUID" not in json.dumps(error)
    assert poll(client, task_uuid, ALICE)["status"] == "success"


def test_another_key_cannot_take_over_a_session_by_its_uuid(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = upscale_task(data_uri(encode(photo_crop(32, 32))), model=None)
    with JobGate(monkeypatch) as gate:
        with client.websocket_connect("/v1") as ws:
            session = auth(ws, ALICE)
            ws.send_text(json.dumps([task]))
            gate.wait_held()  # Alice leaves with her task running
        with client.websocket_connect("/v1") as intruder:
            assert auth(intruder, BOB, session) == session  # a session of Bob's own, under the UUID he named
            gate.open()
            assert wait_finished(client, task["taskUUID"], ALICE)["status"] == "success"
            intruder.send_text(json.dumps([{"taskType": "ping", "ping": True}]))
            assert json.loads(intruder.receive_text())["data"][0]["taskType"] == "ping"  # nothing of Alice's came first
    with client.websocket_connect("/v1") as ws:
        assert auth(ws, ALICE, session) == session
        frame = json.loads(ws.receive_text())
        assert frame["data"][0]["taskUUID"] == task["taskUUID"]  # kept for Alice all along


def test_open_mode_is_one_tenant(tmp_path: Path) -> None:
    with api_client(resize_settings(tmp_path)) as client:
        task_uuid = upload(client, "one")["data"][0]["taskUUID"]
        assert poll(client, task_uuid, "another")["status"] == "success"


@pytest.mark.local_only
def test_records_keep_a_hash_of_the_key_never_the_key(client: TestClient, tmp_path: Path) -> None:
    task_uuid = upload(client, ALICE)["data"][0]["taskUUID"]
    database = tmp_path / DATABASE_NAME
    with contextlib.closing(sqlite3.connect(database)) as db:
        owner = db.execute("SELECT owner FROM tasks WHERE task_uuid = ?", (task_uuid,)).fetchone()[0]
        assert owner == owner_of(ALICE)
        assert not db.execute("SELECT 1 FROM tasks WHERE instr(item || owner, ?)", (ALICE,)).fetchall()

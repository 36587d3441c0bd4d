"""Load on a real server: hundreds of async upscales from concurrent REST and WebSocket clients.

Every task is accounted for: it ends ``success`` with a downloadable image of exactly the factor size,
or it was refused at submission with a clear ``rateLimitExceeded`` (and then was never run). Nothing is
lost, duplicated or answered with a 5xx, and the server logs no traceback. The server runs the resize
engine: what is under load here is the protocol, admission, the queue, storage and serving, not a network.
Admission is decided when a request's tasks are parsed, before any of them runs, so how many of a
10-task request fit under ``UPSCALE_MAX_QUEUE`` does not depend on how fast the upscales are.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from tests.api_helpers import data_uri, encode, photo_crop
from tests.e2e.conftest import live_server_at
from upscale_server.testing import UpscaleTestServer

SMALL_MODEL = "local:realesr-animevideov3@1"
FACTOR = 2
INPUT = data_uri(encode(photo_crop(16, 16)))
POLL_BATCH = 50
DEADLINE_S = 120.0  # a guard against a hang, not a measurement


def async_upscale() -> dict[str, Any]:
    return {
        "taskType": "imageUpscale",
        "taskUUID": str(uuid.uuid4()),
        "inputImage": INPUT,
        "model": SMALL_MODEL,
        "upscaleFactor": FACTOR,
        "outputFormat": "PNG",
        "deliveryMethod": "async",
    }


class Ledger:
    """What the clients saw at submission: one entry per answer, by taskUUID."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.acks: list[str] = []
        self.refusals: list[dict[str, Any]] = []
        self.statuses: list[int] = []

    def record(self, tasks: list[dict[str, Any]], reply: dict[str, Any]) -> None:
        self.sent += [task["taskUUID"] for task in tasks]
        for item in reply.get("data", []):
            assert set(item) == {"taskType", "taskUUID"}, f"an async ack carries only the echo: {item}"
            self.acks.append(item["taskUUID"])
        self.refusals += reply.get("errors", [])


async def rest_client(server: UpscaleTestServer, ledger: Ledger, batches: list[int]) -> None:
    auth = {"Authorization": f"Bearer {server.api_key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=60) as client:
        for size in batches:
            tasks = [async_upscale() for _ in range(size)]
            response = await client.post("/v1", json=tasks)
            ledger.statuses.append(response.status_code)
            ledger.record(tasks, response.json())


async def ws_client(server: UpscaleTestServer, ledger: Ledger, batches: list[int]) -> None:
    async with connect(server.ws_url, max_size=None, open_timeout=10) as ws:
        await ws.send(json.dumps([{"taskType": "authentication", "apiKey": server.api_key}]))
        assert "connectionSessionUUID" in await asyncio.wait_for(ws.recv(), 10)
        for size in batches:
            tasks = [async_upscale() for _ in range(size)]
            await ws.send(json.dumps(tasks))
            for _ in tasks:  # one frame per task: its ack or its refusal
                ledger.record([], json.loads(await asyncio.wait_for(ws.recv(), 30)))
            ledger.sent += [task["taskUUID"] for task in tasks]


async def submit(server: UpscaleTestServer, rest_batches: list[list[int]], ws_batches: list[list[int]]) -> Ledger:
    ledger = Ledger()
    await asyncio.gather(
        *(rest_client(server, ledger, batches) for batches in rest_batches),
        *(ws_client(server, ledger, batches) for batches in ws_batches),
    )
    return ledger


def poll_until_finished(server: UpscaleTestServer, task_uuids: list[str]) -> dict[str, dict[str, Any]]:
    """getResponse for every task until none is ``processing``; returns the final item of each."""
    final: dict[str, dict[str, Any]] = {}
    pending = list(task_uuids)
    deadline = time.monotonic() + DEADLINE_S
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}) as client:
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} tasks still processing after {DEADLINE_S} s"
            for start in range(0, len(pending), POLL_BATCH):
                batch = pending[start : start + POLL_BATCH]
                response = client.post("/v1", json=[{"taskType": "getResponse", "taskUUID": u} for u in batch])
                assert response.status_code < 500, response.text
                for item in response.json().get("data", []) + response.json().get("errors", []):
                    if item.get("status") in ("success", "error"):
                        final[item["taskUUID"]] = item
            pending = [task_uuid for task_uuid in pending if task_uuid not in final]
            if pending:
                time.sleep(0.2)
    return final


def check_downloads(server: UpscaleTestServer, items: list[dict[str, Any]]) -> None:
    """Every imageURL serves a PNG of exactly 16*FACTOR pixels a side, from this server."""

    async def download_all() -> list[bytes]:
        async with httpx.AsyncClient(timeout=30) as client:
            limit = asyncio.Semaphore(8)

            async def one(url: str) -> bytes:
                async with limit:
                    response = await client.get(url)
                    assert response.status_code == 200, (url, response.status_code)
                    return response.content

            return await asyncio.gather(*(one(item["imageURL"]) for item in items))

    for item in items:
        assert item["imageURL"].startswith(server.url + "/image/"), item
    for content in asyncio.run(download_all()):
        with Image.open(io.BytesIO(content)) as image:
            assert image.format == "PNG" and image.size == (16 * FACTOR, 16 * FACTOR)


@pytest.fixture
def load_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[UpscaleTestServer]:
    with live_server_at(tmp_path, env={"UPSCALE_MAX_QUEUE": str(request.param)}) as server:
        yield server


@pytest.mark.parametrize("load_server", [256], indirect=True)
def test_200_concurrent_async_upscales_all_succeed(load_server: UpscaleTestServer) -> None:
    """Proves that 200 async upscales from 8 REST and 2 WebSocket clients at once are each acknowledged
    once, all end ``success`` (the queue limit of 256 is never hit) with a distinct output image of
    exactly the factor size, and that no request gets a 5xx and the server logs no traceback."""
    rest = [[1, 2, 3, 4, 5, 5] for _ in range(8)]  # 8 clients x 20 tasks
    ws = [[1, 4, 5, 10] for _ in range(2)]  # 2 clients x 20 tasks
    ledger = asyncio.run(submit(load_server, rest, ws))

    assert len(ledger.sent) == 200 == len(set(ledger.sent))
    assert not ledger.refusals, ledger.refusals[:3]
    assert all(status == 200 for status in ledger.statuses), Counter(ledger.statuses)
    assert Counter(ledger.acks) == Counter(ledger.sent), "an ack is missing or duplicated"

    final = poll_until_finished(load_server, ledger.sent)
    failed = [item for item in final.values() if item["status"] != "success"]
    assert not failed, failed[:3]
    assert len({item["imageUUID"] for item in final.values()}) == 200, "two tasks share an output"
    check_downloads(load_server, list(final.values()))
    assert "Traceback" not in load_server.log()


@pytest.mark.parametrize("load_server", [4], indirect=True)
def test_overload_refuses_clearly_and_loses_nothing(load_server: UpscaleTestServer) -> None:
    """Proves that past ``UPSCALE_MAX_QUEUE`` (4 here) a task is refused at submission with
    ``rateLimitExceeded`` under its own taskUUID (429 when the whole request is refused), that a refused
    task was never run (getResponse: ``taskNotFound``), and that every accepted task still succeeds:
    accepted + refused = sent, with nothing lost or duplicated."""
    rest = [[10, 10] for _ in range(5)]  # 10 tasks per request: at least 6 of each are over the limit
    ws = [[10]]
    ledger = asyncio.run(submit(load_server, rest, ws))

    assert len(ledger.sent) == 110 == len(set(ledger.sent))
    refused = Counter(item["taskUUID"] for item in ledger.refusals)
    assert ledger.refusals and all(item["code"] == "rateLimitExceeded" for item in ledger.refusals), ledger.refusals
    assert all(isinstance(item["message"], str) and item["message"] for item in ledger.refusals)
    assert all(status in (200, 429) for status in ledger.statuses), Counter(ledger.statuses)
    assert max(Counter(ledger.acks).values()) == 1 and max(refused.values()) == 1
    assert not set(ledger.acks) & set(refused), "a task was both accepted and refused"
    assert len(ledger.acks) + len(refused) == 110, "a task got no answer at submission"

    final = poll_until_finished(load_server, ledger.acks)
    assert all(item["status"] == "success" for item in final.values()), list(final.values())[:3]
    check_downloads(load_server, list(final.values()))

    auth = {"Authorization": f"Bearer {load_server.api_key}"}
    polls = [{"taskType": "getResponse", "taskUUID": task_uuid} for task_uuid in list(refused)[:50]]
    reply = httpx.post(f"{load_server.url}/v1", json=polls, headers=auth, timeout=30).json()
    assert "data" not in reply and {item["code"] for item in reply["errors"]} == {"taskNotFound"}
    assert "Traceback" not in load_server.log()

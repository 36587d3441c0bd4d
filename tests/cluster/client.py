"""What the cluster tests do as a client: REST calls to a chosen node, WebSocket sessions, waits on state."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import redis
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from tests.api_helpers import b64, encode, new_uuid
from tests.cluster.nodes import KEY, Node

T = TypeVar("T")
HEADERS = {"Authorization": f"Bearer {KEY}"}
#: Guard for every wait (a bound, not a measure).
WAIT_TIMEOUT = 60.0


def png(width: int = 24, height: int = 16, color: tuple[int, int, int] = (200, 30, 40)) -> str:
    """A plain PNG as the base64 text a task carries (its width is what the crash hook looks at)."""
    return b64(encode(Image.new("RGB", (width, height), color)))


def upscale(image: str, **fields: Any) -> dict[str, Any]:
    return {
        "taskType": "imageUpscale",
        "taskUUID": new_uuid(),
        "inputImage": image,
        "upscaleFactor": 2,
        "outputType": "URL",
        **fields,
    }


def post(node: Node, tasks: list[dict[str, Any]], *, timeout: float = WAIT_TIMEOUT) -> httpx.Response:
    return httpx.post(node.url + "/v1", json=tasks, headers=HEADERS, timeout=timeout)


def poll(node: Node, task_uuid: str) -> dict[str, Any]:
    """The getResponse answer: the data item or the error item."""
    body = post(node, [{"taskType": "getResponse", "taskUUID": task_uuid}]).json()
    items: list[dict[str, Any]] = body.get("data") or body.get("errors")
    return items[0]


def wait_until(check: Callable[[], T | None], what: str, timeout: float = WAIT_TIMEOUT, every: float = 0.05) -> T:
    """``check()``'s first truthy answer; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"still waiting for {what} after {timeout:g} s")


def finished(node: Node, task_uuid: str, timeout: float = WAIT_TIMEOUT) -> dict[str, Any]:
    """Poll ``node`` until the task is no longer processing; its final item."""

    def done() -> dict[str, Any] | None:
        item = poll(node, task_uuid)
        return None if item.get("status") == "processing" else item

    return wait_until(done, f"task {task_uuid} to finish", timeout, every=0.1)


class Store:
    """Direct reads of the test's Redis keys (what the cluster recorded)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.prefix = prefix

    def task(self, task_uuid: str) -> dict[str, str]:
        return self.client.hgetall(f"{self.prefix}task:{task_uuid}")  # type: ignore[return-value]

    def stream_length(self, name: str = "jobs") -> int:
        return int(self.client.xlen(self.prefix + name))

    def pending(self) -> int:
        try:
            return int(self.client.xpending(self.prefix + "jobs", "workers")["pending"])  # type: ignore[index]
        except redis.ResponseError:  # no group yet
            return 0

    def dead_letters(self) -> list[dict[str, str]]:
        return [fields for _, fields in self.client.xrange(self.prefix + "dlq")]  # type: ignore[union-attr]


class Socket:
    """A WebSocket client of one node, authenticated, with its session id."""

    def __init__(self, node: Node, session: str | None = None) -> None:
        self._stack = contextlib.ExitStack()
        self.connection: ClientConnection = self._stack.enter_context(
            connect(node.ws_url, open_timeout=10, max_size=None)
        )
        auth: dict[str, Any] = {"taskType": "authentication", "apiKey": KEY}
        if session is not None:
            auth["connectionSessionUUID"] = session
        self.send([auth])
        frame = self.receive()
        self.session: str = frame["data"][0]["connectionSessionUUID"]

    def send(self, tasks: list[dict[str, Any]]) -> None:
        self.connection.send(json.dumps(tasks))

    def receive(self, timeout: float = WAIT_TIMEOUT) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(self.connection.recv(timeout=timeout))
        return frame

    def close(self) -> None:
        self._stack.close()

"""WebSocket transport on ``/v1``: the authentication handshake, ping, and results pushed by taskUUID.

Each incoming frame is dispatched in its own asyncio task, so the receive loop keeps answering
pings while upscales run. A frame carries either ``data`` or ``errors``, never both: the Python SDK
ignores ``data`` in a frame that has ``errors``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from server.api.state import ServerState, server_state
from server.errors import InvalidRequestError, MissingApiKeyError, UpscaleError, error_item
from server.protocol import auth_item, envelope, is_uuid, parse_request_body, pong_item, task_identity
from server.tasks.dispatcher import Outcome

log = logging.getLogger(__name__)
router = APIRouter()

LARGE_FRAME = 1 << 20


class WebSocketSession:
    """One connection: authenticated once, then every frame is a task array."""

    def __init__(self, socket: WebSocket, state: ServerState) -> None:
        self.socket = socket
        self.state = state
        self.session_uuid: str | None = None
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def send(self, payload: dict[str, Any]) -> None:
        if self._closed:
            return
        text = json.dumps(payload)
        async with self._send_lock:
            try:
                await self.socket.send_text(text)
            except (WebSocketDisconnect, RuntimeError):
                self._closed = True  # results stay pollable with getResponse

    async def emit(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            await self.send(envelope(errors=[outcome.error]))
        elif outcome.item is not None:
            await self.send(envelope(data=[outcome.item]))

    async def run(self) -> None:
        try:
            while True:
                message = await self.socket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None and message.get("bytes") is not None:
                    text = message["bytes"].decode("utf-8", errors="replace")
                await self.handle_frame(text or "")
        except WebSocketDisconnect:
            pass
        finally:
            self._closed = True

    async def handle_frame(self, text: str) -> None:
        try:
            body = text.encode()
            if len(body) > LARGE_FRAME:
                raw_tasks = await asyncio.to_thread(parse_request_body, body)
            else:
                raw_tasks = parse_request_body(body)
        except UpscaleError as exc:
            await self.send(envelope(errors=[error_item(exc, task_type=None, task_uuid=None)]))
            return
        if raw_tasks and task_identity(raw_tasks[0])[0] == "authentication":
            if not await self.authenticate(raw_tasks[0]):
                return
            raw_tasks = raw_tasks[1:]
        if not raw_tasks:
            return
        if self.session_uuid is None:
            await self.refuse_unauthenticated(raw_tasks)
            return
        task = asyncio.create_task(
            self.state.dispatcher.dispatch(raw_tasks, base_url=self.state.base_url(self.socket), emit=self.emit)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def authenticate(self, raw: object) -> bool:
        fields: dict[str, Any] = raw if isinstance(raw, dict) else {}
        key = fields.get("apiKey")
        try:
            if key is not None and not isinstance(key, str):
                raise InvalidRequestError("apiKey must be a string", parameter="apiKey")
            self.state.keys.check(key)
        except UpscaleError as exc:
            await self.send(envelope(errors=[error_item(exc, task_type="authentication", task_uuid=None)]))
            return False
        requested = fields.get("connectionSessionUUID")
        self.session_uuid = requested if isinstance(requested, str) and is_uuid(requested) else str(uuid.uuid4())
        await self.send(envelope(data=[auth_item(self.session_uuid)]))
        return True

    async def refuse_unauthenticated(self, raw_tasks: list[object]) -> None:
        """Before authentication only pings are answered; every other task is refused under its own id."""
        for raw in raw_tasks:
            task_type, task_uuid = task_identity(raw)
            if task_type == "ping":
                await self.send(envelope(data=[pong_item()]))
                continue
            exc = MissingApiKeyError(
                'authenticate first: send [{"taskType": "authentication", "apiKey": "..."}]',
                parameter="apiKey",
            )
            await self.send(envelope(errors=[error_item(exc, task_type=task_type, task_uuid=task_uuid)]))


@router.websocket("/v1")
async def websocket_endpoint(socket: WebSocket) -> None:
    await socket.accept()
    await WebSocketSession(socket, server_state(socket)).run()

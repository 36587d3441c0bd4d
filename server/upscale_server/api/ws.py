"""WebSocket transport on ``/v1``: the authentication handshake, ping, and results pushed by taskUUID.

Each incoming frame is dispatched in its own asyncio task, so the receive loop keeps answering
pings while upscales run. Results go to the connection's :class:`~upscale_server.sessions.Session`,
which keeps them while the client is away, so a reconnect with the same ``connectionSessionUUID``
receives them. A frame carries either ``data`` or ``errors``, never both:
the Python SDK ignores ``data`` in a frame that has ``errors``. A failed authentication also carries
a singular ``error``.

``/v1/`` is the same endpoint. ``?dryRun=1`` on the URL (SDK-JS's ``dryRun`` option) makes every task
of the connection a dry run: validated as a real run would be, answered, never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.types import Message

from upscale_server import json_text
from upscale_server.api.context import ServerContext, dry_run_requested, parse_tasks, server_context
from upscale_server.connections import lift_frame_limit
from upscale_server.errors import MissingApiKeyError, PayloadTooLargeError, UpscaleError, error_item
from upscale_server.protocol import Outcome, auth_item, envelope, pong_item, task_identity
from upscale_server.sessions import Session

log = logging.getLogger(__name__)
router = APIRouter()


class Connection:
    """One socket: unauthenticated until an authentication task succeeds, then bound to a session."""

    def __init__(self, socket: WebSocket, context: ServerContext) -> None:
        self.socket = socket
        self.context = context
        self.session: Session | None = None
        #: The tenant of the key the connection authenticated with (see :func:`~upscale_server.api.auth.owner_of`).
        self.owner = ""
        self.dry_run = dry_run_requested(socket.query_params.get("dryRun"))
        self._tasks: set[asyncio.Task[None]] = set()
        self._opened = asyncio.get_running_loop().time()

    async def send_text(self, text: str) -> None:
        await self.socket.send_text(text)

    async def reply(self, payload: dict[str, Any]) -> None:
        """Answer on this socket directly (handshake and pre-auth replies belong to no session)."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            # ASCII-escaped: echoes may hold lone surrogates
            await self.socket.send_text(await json_text.dumps(payload))

    async def emit(self, outcome: Outcome) -> None:
        assert self.session is not None
        await self.session.deliver(outcome.envelope())

    async def run(self) -> None:
        try:
            while True:
                message = await self.receive()
                if message is None or message["type"] == "websocket.disconnect":
                    break
                if self.session is None and _frame_size(message) > self.context.settings.max_unauthenticated_bytes:
                    await self.refuse_big_frame()
                    break
                frame: str | bytes | None = message.get("text")
                if frame is None:  # a binary frame, or a big text frame handed over undecoded (connections.py)
                    frame = message.get("bytes")
                await self.handle_frame(frame or "")
        except WebSocketDisconnect:
            pass
        finally:
            if self.session is not None:
                with contextlib.suppress(Exception):  # a store that is unreachable now expires it anyway
                    await self.session.detach(self.send_text)

    async def receive(self) -> Message | None:
        """The next message; None once the connection was closed for waiting: unauthenticated past
        ``ws_auth_timeout_seconds`` after it opened, or idle (no frame, no request of its own running)
        for ``ws_idle_timeout_seconds``."""
        settings = self.context.settings
        while True:
            if self.session is None:
                timeout = self._opened + settings.ws_auth_timeout_seconds - asyncio.get_running_loop().time()
            else:
                timeout = settings.ws_idle_timeout_seconds
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    return await self.socket.receive()
            except TimeoutError:
                if self.session is not None and self._tasks:
                    continue  # its requests are still running: not idle
            if self.session is None:
                exc = MissingApiKeyError(
                    f"no authentication within {settings.ws_auth_timeout_seconds:g} s of connecting",
                    parameter="apiKey",
                )
                await self.reply(envelope(errors=[error_item(exc, task_type="authentication", task_uuid=None)]))
                await self.close(1008, "authentication timeout")
            else:
                await self.close(1001, "idle timeout")
            return None

    async def refuse_big_frame(self) -> None:
        """A frame over the unauthenticated limit before authentication: an error frame, then close 1009."""
        limit = self.context.settings.max_unauthenticated_bytes
        exc = PayloadTooLargeError(
            f"Frames are limited to {limit} bytes until the connection is authenticated "
            "(UPSCALE_MAX_UNAUTHENTICATED_BYTES): authenticate first.",
            max=limit,
        )
        await self.reply(envelope(errors=[error_item(exc, task_type=None, task_uuid=None)]))
        await self.close(1009, "authenticate before sending big frames")

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await self.socket.close(code, reason)

    async def handle_frame(self, frame: str | bytes) -> None:
        """Run a frame's tasks. Bytes (a binary frame, or a big text frame) are parsed as UTF-8 JSON, off
        the loop when big; bytes that are not UTF-8 are refused as JSON that does not parse."""
        try:
            raw_tasks = await parse_tasks(frame, self.context.settings)
        except UpscaleError as exc:
            await self.reply(envelope(errors=[error_item(exc, task_type=None, task_uuid=None)]))
            return
        if raw_tasks and task_identity(raw_tasks[0])[0] == "authentication":
            authenticated = await self.authenticate(raw_tasks)
            if authenticated is None:
                return
            raw_tasks = authenticated
        if not raw_tasks:
            return
        if self.session is None:
            await self.refuse_unauthenticated(raw_tasks)
            return
        task = asyncio.create_task(
            self.context.dispatcher.dispatch(
                raw_tasks,
                base_url=self.context.base_url(self.socket),
                emit=self.emit,
                session=self.session.key,
                dry_run=self.dry_run,
                owner=self.owner,
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def authenticate(self, raw_tasks: list[object]) -> list[object] | None:
        """Authenticate with the frame's leading task and attach to its session (one of the key's own:
        another key's ``connectionSessionUUID`` opens a new session); returns the tasks after it, or None
        when refused (the error is the reply)."""
        try:
            owner, task, rest = self.context.keys.authenticate_frame(raw_tasks)
            if self.session is not None:
                await self.session.detach(self.send_text)
            session = await self.context.sessions.open(task.connection_session_uuid, owner)
        except UpscaleError as exc:
            await self.refuse_authentication(exc)
            return None
        await self.reply(envelope(data=[auth_item(session.uuid)]))
        self.session, self.owner = session, owner
        lift_frame_limit(self.socket.scope, self.context.settings.max_frame_bytes)
        # Flushes results that finished while the client was away.
        await session.attach(self.send_text, self.context.base_url(self.socket))
        return rest

    async def refuse_authentication(self, exc: UpscaleError) -> None:
        """Answer a failed authentication so that every client learns of it at once.

        The frame carries the ``errors`` array the SDKs read and, beside it, the same item as a singular
        ``error`` object (older Runware answers carried one, and the newer TypeScript SDK recognises an
        auth failure only by it: without it, it waits for its authentication timeout). The socket stays
        open, as before: the Python ``runware`` SDK reports the refusal on its next call, and a socket
        closed under it makes that call hang instead (measured with runware 0.5.24)."""
        item = error_item(exc, task_type="authentication", task_uuid=None)
        log.info("WebSocket authentication refused: %s: %s", exc.code, exc.message)
        await self.reply({**envelope(errors=[item]), "error": item})

    async def refuse_unauthenticated(self, raw_tasks: list[object]) -> None:
        """Before authentication only pings are answered; every other task is refused under its own id."""
        for raw in raw_tasks:
            task_type, task_uuid = task_identity(raw)
            if task_type == "ping":
                await self.reply(envelope(data=[pong_item()]))
                continue
            exc = MissingApiKeyError(
                'authenticate first: send [{"taskType": "authentication", "apiKey": "..."}]',
                parameter="apiKey",
            )
            await self.reply(envelope(errors=[error_item(exc, task_type=task_type, task_uuid=task_uuid)]))


def _frame_size(message: Message) -> int:
    """A received frame's length (characters of a text frame, bytes of a binary one)."""
    data = message.get("text")
    if data is None:
        data = message.get("bytes")
    return len(data) if data is not None else 0


@router.websocket("/v1")
@router.websocket("/v1/")
async def websocket_endpoint(socket: WebSocket) -> None:
    await socket.accept()
    await Connection(socket, server_context(socket)).run()

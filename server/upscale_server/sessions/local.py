"""Sessions kept in this process: a session outlives its socket for ``resume_seconds``.

Results are delivered to the session, which sends them on its current socket or keeps them (at most
:data:`MAX_BUFFERED_FRAMES`) until one attaches or the session expires.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from upscale_server.sessions import Sender

log = logging.getLogger(__name__)

#: Frames kept per detached session; beyond this the oldest are dropped (they stay pollable).
MAX_BUFFERED_FRAMES = 256


class LocalSession:
    """Results for one client session; sends through the attached connection, buffers otherwise."""

    def __init__(self, session_uuid: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.uuid = session_uuid
        self._clock = clock
        self._sender: Sender | None = None
        self._buffer: deque[str] = deque(maxlen=MAX_BUFFERED_FRAMES)
        self._lock = asyncio.Lock()
        self.detached_at: float | None = None

    async def attach(self, sender: Sender, base_url: str = "") -> None:
        """Make ``sender`` the connection of this session and flush what was buffered meanwhile."""
        async with self._lock:
            self._sender = sender
            self.detached_at = None
            while self._buffer:
                frame = self._buffer[0]
                if not await self._try_send(frame):
                    return
                self._buffer.popleft()

    async def detach(self, sender: Sender) -> None:
        if self._sender is sender:
            self._sender = None
            self.detached_at = self._clock()

    async def deliver(self, payload: dict[str, Any]) -> None:
        frame = json.dumps(payload)
        async with self._lock:
            if self._sender is None or not await self._try_send(frame):
                self._buffer.append(frame)

    async def _try_send(self, frame: str) -> bool:
        sender = self._sender
        if sender is None:
            return False
        try:
            await sender(frame)
        except Exception:  # the connection went away mid-send: keep the frame for a reconnect
            self._sender = None
            self.detached_at = self._clock()
            return False
        return True


class LocalSessionStore:
    """All live sessions; detached ones are forgotten ``resume_seconds`` after their connection ended."""

    def __init__(self, *, resume_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.resume_seconds = resume_seconds
        self._clock = clock
        self._sessions: dict[str, LocalSession] = {}

    async def open(self, requested: str | None) -> LocalSession:
        """The session to use for a new connection: the requested one if it is still alive, else a new one."""
        self.expire()
        if requested is not None and requested in self._sessions:
            return self._sessions[requested]
        session = LocalSession(requested or str(uuid.uuid4()), self._clock)
        self._sessions[session.uuid] = session
        return session

    def expire(self) -> int:
        now = self._clock()
        stale = [
            key
            for key, session in self._sessions.items()
            if session.detached_at is not None and now - session.detached_at > self.resume_seconds
        ]
        for key in stale:
            del self._sessions[key]
        return len(stale)

    def __len__(self) -> int:
        return len(self._sessions)

"""Sessions kept in this process: a session outlives its socket for ``resume_seconds``.

Results are delivered to the session, which sends them on its current socket or keeps them until one
attaches or the session expires. What a detached session keeps is bounded three times: at most
:data:`MAX_BUFFERED_FRAMES` frames, at most ``buffer_bytes`` of frame text (a result frame can
inline a whole image as base64), and all sessions together at most ``total_bytes`` (else fifty absent
clients could hold fifty times the per-session bound). Beyond any bound the oldest frames of the session
at hand are dropped: a reconnecting
client does not receive them, but every task stays pollable by its taskUUID (``getResponse``) while its
record lives. Detached sessions are forgotten by :meth:`LocalSessionStore.expire`, which
:meth:`LocalSessionStore.expire_forever` runs on a schedule for the lifetime of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from upscale_server import json_text
from upscale_server.sessions import Sender, session_key

log = logging.getLogger(__name__)

#: Frames kept per detached session; beyond this the oldest are dropped (they stay pollable).
MAX_BUFFERED_FRAMES = 256
#: Default bound on the frame text a detached session keeps (``UPSCALE_SESSION_BUFFER_BYTES``).
DEFAULT_BUFFER_BYTES = 64 * 2**20


class BufferPool:
    """The frame text all sessions of a store keep together, against one bound."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.used = 0

    @property
    def over(self) -> bool:
        return self.limit is not None and self.used > self.limit


class LocalSession:
    """Results for one client session; sends through the attached connection, buffers otherwise."""

    def __init__(
        self,
        session_uuid: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        owner: str = "",
        pool: BufferPool | None = None,
    ) -> None:
        self.uuid = session_uuid
        self._pool = pool or BufferPool()
        self.key = session_key(owner, session_uuid)
        self._clock = clock
        self._sender: Sender | None = None
        self._buffer: deque[str] = deque()
        #: Length of the frames in ``_buffer``: JSON text is ASCII (``json.dumps`` escapes the rest), so
        #: characters are bytes.
        self._buffered_bytes = 0
        self.buffer_bytes = buffer_bytes
        #: Frames dropped because a bound was reached (since the session was created).
        self.dropped = 0
        self._lock = asyncio.Lock()
        self.detached_at: float | None = None
        #: Set once the store forgot the session: frames for it are discarded, not kept.
        self.expired = False

    @property
    def buffered_bytes(self) -> int:
        return self._buffered_bytes

    @property
    def buffered_frames(self) -> int:
        return len(self._buffer)

    async def attach(self, sender: Sender, base_url: str = "") -> None:
        """Make ``sender`` the connection of this session and flush what was buffered meanwhile."""
        async with self._lock:
            self._sender = sender
            self.detached_at = None
            while self._buffer:
                frame = self._buffer[0]
                if not await self._try_send(frame):
                    return
                self._pop_oldest()

    async def detach(self, sender: Sender) -> None:
        if self._sender is sender:
            self._sender = None
            self.detached_at = self._clock()

    async def deliver(self, payload: dict[str, Any]) -> None:
        frame = await json_text.dumps(payload)
        async with self._lock:
            if self._sender is None or not await self._try_send(frame):
                self._keep(frame)

    def forget(self) -> None:
        """The store dropped this session: free its frames, and keep none delivered from now on."""
        self.expired = True
        self._buffer.clear()
        self._pool.used -= self._buffered_bytes
        self._buffered_bytes = 0

    def _keep(self, frame: str) -> None:
        """Buffer ``frame``, dropping the oldest frames while a bound is exceeded (the new one included,
        if it alone is over the byte bound)."""
        if self.expired:
            return
        self._buffer.append(frame)
        self._buffered_bytes += len(frame)
        self._pool.used += len(frame)
        dropped = 0
        while self._buffer and (
            len(self._buffer) > MAX_BUFFERED_FRAMES or self._buffered_bytes > self.buffer_bytes or self._pool.over
        ):
            self._pop_oldest()
            dropped += 1
        if dropped:
            self.dropped += dropped
            log.warning(
                "session %s: %d buffered frame(s) dropped (over %d frames, %d bytes, or %s bytes for all "
                "sessions); their tasks stay pollable",
                self.uuid,
                dropped,
                MAX_BUFFERED_FRAMES,
                self.buffer_bytes,
                self._pool.limit,
            )

    def _pop_oldest(self) -> None:
        size = len(self._buffer.popleft())
        self._buffered_bytes -= size
        self._pool.used -= size

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

    def __init__(
        self,
        *,
        resume_seconds: float,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        total_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resume_seconds = resume_seconds
        self.buffer_bytes = buffer_bytes
        self.pool = BufferPool(total_bytes)
        self._clock = clock
        self._sessions: dict[str, LocalSession] = {}

    @property
    def check_interval(self) -> float:
        """How often :meth:`expire_forever` looks: a quarter of the resume window, between 1 s and 30 s, so a
        session outlives its window by at most that."""
        return min(max(self.resume_seconds / 4, 1.0), 30.0)

    async def open(self, requested: str | None, owner: str = "") -> LocalSession:
        """The session to use for a new connection of ``owner``: the requested one if ``owner`` has it
        alive, else a new one."""
        self.expire()
        if requested is not None and (kept := self._sessions.get(session_key(owner, requested))) is not None:
            return kept
        session = LocalSession(
            requested or str(uuid.uuid4()), self._clock, buffer_bytes=self.buffer_bytes, owner=owner, pool=self.pool
        )
        self._sessions[session.key] = session
        return session

    def expire(self) -> int:
        """Forget the sessions detached longer than ``resume_seconds``; returns how many."""
        now = self._clock()
        stale = [
            key
            for key, session in self._sessions.items()
            if session.detached_at is not None and now - session.detached_at > self.resume_seconds
        ]
        for key in stale:
            self._sessions.pop(key).forget()
        return len(stale)

    async def expire_forever(self, *, stop: asyncio.Event, interval: float | None = None) -> None:
        """:meth:`expire` now, then every ``interval`` seconds (default :attr:`check_interval`) until ``stop``
        is set; cancelling the task also ends it."""
        interval = self.check_interval if interval is None else interval
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        while not stop.is_set():
            removed = self.expire()
            if removed:
                log.debug("%d detached session(s) expired", removed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)

    def __len__(self) -> int:
        return len(self._sessions)

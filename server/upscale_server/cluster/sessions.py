"""WebSocket sessions in Redis: any node can hold a session's socket, and a client resumes on any node.

A session is a hash (owner node, epoch, last frame sent) and a capped stream of frames. Everything for
the client goes through the stream: frames the accepting node emits (acknowledgements, errors) and,
appended by the worker's finish script, references to finished sync tasks, which the owning node
reads back from the task records when it sends them (so megabytes of base64 never sit in Redis). No
node keeps frames in memory for a detached session, so the single process's byte bound
(``UPSCALE_SESSION_BUFFER_BYTES``) has nothing to bound here: the stream's length cap and TTL do.
The owner is woken by a ``sess`` message and also pumps every check interval, so a lost message costs
at most that long.

Authenticating with a known ``connectionSessionUUID`` takes the session over (the epoch goes up, the
old owner is told to let go) and sends the frames after the last one sent. A session lives while a
node holds it (renewed every check) and ``resume_seconds`` after its socket closed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from typing import Any, cast

import redis.asyncio

from upscale_server import json_text
from upscale_server.cluster import scripts
from upscale_server.cluster.connect import REDIS_FAILURES, unavailable_on_failure
from upscale_server.cluster.keys import Keys
from upscale_server.cluster.records import SESSION_FRAMES
from upscale_server.cluster.wakeups import Wakeups
from upscale_server.sessions import FrameReader, Sender

log = logging.getLogger(__name__)

#: Frames read from the stream per round trip.
PUMP_BATCH = 64


class RedisSession:
    """One session as this node holds it (while its socket is attached here)."""

    def __init__(self, store: RedisSessionStore, session_uuid: str, epoch: int, last: str) -> None:
        self.store = store
        self.uuid = session_uuid
        self.epoch = epoch
        self.last = last
        self.base_url = ""
        self._sender: Sender | None = None
        self._lock = asyncio.Lock()

    @property
    def attached(self) -> bool:
        return self._sender is not None

    async def attach(self, sender: Sender, base_url: str) -> None:
        self._sender = sender
        self.base_url = base_url
        self.store.attached[self.uuid] = self
        await self.pump()

    async def detach(self, sender: Sender) -> None:
        if self._sender is not sender:
            return
        self._let_go()
        await self.store.keep(self, self.store.resume_ms)

    async def deliver(self, payload: dict[str, Any]) -> None:
        """Append ``payload`` to the session's frames; its owner (maybe this node) sends it. Never raises:
        a frame that cannot be kept now is lost for the socket, and the task stays pollable."""
        try:
            await self.store.append(self.uuid, "frame", await json_text.dumps(payload))
        except Exception as exc:
            log.warning("session %s: a frame could not be kept (%s)", self.uuid, exc.__class__.__name__)

    async def pump(self) -> None:
        """Send every frame after the last one sent, in order, while this node holds the session."""
        async with self._lock:
            while self._sender is not None:
                try:
                    entries = await self.store.client.xrange(
                        self.store.keys.session_frames(self.uuid), min=f"({self.last}", max="+", count=PUMP_BATCH
                    )
                except REDIS_FAILURES as exc:
                    log.warning("session %s: frames unreachable (%s)", self.uuid, exc.__class__.__name__)
                    return
                if not entries:
                    return
                for entry_id, fields in entries:
                    text = await self._frame_text(cast(dict[str, str], fields))
                    if text is not None and not await self._send(text):
                        return
                    self.last = str(entry_id)
                if not await self.store.sent(self):
                    self._lost()
                    return

    async def _frame_text(self, fields: dict[str, str]) -> str | None:
        if "frame" in fields:
            return fields["frame"]
        payload = await self.store.read_frame(fields["task"], self.base_url)
        return None if payload is None else await json_text.dumps(payload)

    async def _send(self, text: str) -> bool:
        sender = self._sender
        if sender is None:
            return False
        try:
            await sender(text)
        except Exception:  # the socket went away mid-send: the frame stays for the next one
            await self.detach(sender)
            return False
        return True

    def _lost(self) -> None:
        """Another connection took the session (on this node or another): stop sending here."""
        log.info("session %s was taken over by another connection", self.uuid)
        self._let_go()

    def _let_go(self) -> None:
        """Stop sending on this node: no socket, and no longer among the sessions it holds."""
        self._sender = None
        if self.store.attached.get(self.uuid) is self:
            del self.store.attached[self.uuid]


class RedisSessionStore:
    """:class:`~upscale_server.sessions.SessionStore` on Redis for one node."""

    def __init__(
        self, client: redis.asyncio.Redis, keys: Keys, wakeups: Wakeups, *, node: str, resume_seconds: float
    ) -> None:
        self.client = client
        self.keys = keys
        self.node = node
        self.resume_ms = max(1, int(resume_seconds * 1000))
        #: A held session's life, renewed every check: it outlives a node that dies by about this long.
        self.held_ms = self.resume_ms + int(wakeups.interval * 3000)
        self.attached: dict[str, RedisSession] = {}
        self._spawned: set[asyncio.Task[None]] = set()
        self._read_frame: FrameReader | None = None
        self._take = client.register_script(scripts.SESSION_TAKE)
        self._deliver = client.register_script(scripts.SESSION_DELIVER)
        self._sent = client.register_script(scripts.SESSION_SENT)
        self._keep = client.register_script(scripts.SESSION_KEEP)
        wakeups.on("sess", self._wake)
        wakeups.on("drop", self._drop)
        wakeups.every_interval(self._check)

    def bind(self, read_frame: FrameReader) -> None:
        """How this node reads a finished task back as a frame (the task layer knows the shape)."""
        self._read_frame = read_frame

    async def open(self, requested: str | None) -> RedisSession:
        session_uuid = requested or str(uuid.uuid4())
        with unavailable_on_failure("session store (Redis)"):
            old_owner, epoch, last = await self._take(
                keys=[self.keys.session(session_uuid), self.keys.session_frames(session_uuid)],
                args=[self.node, self.held_ms],
            )
            if old_owner and old_owner != self.node:
                await self.client.publish(self.keys.node(str(old_owner)), f"drop {session_uuid}")
        previous = self.attached.pop(session_uuid, None)
        if previous is not None:
            previous._lost()
        return RedisSession(self, session_uuid, int(epoch), str(last))

    async def append(self, session_uuid: str, field: str, value: str) -> None:
        await self._deliver(
            keys=[self.keys.session(session_uuid), self.keys.session_frames(session_uuid)],
            args=[field, value, self.keys.prefix, session_uuid, SESSION_FRAMES],
        )

    async def read_frame(self, task_uuid: str, base_url: str) -> dict[str, Any] | None:
        if self._read_frame is None:
            raise RuntimeError("the session store was not bound to the task records")
        return await self._read_frame(task_uuid, base_url)

    async def sent(self, session: RedisSession) -> bool:
        """Record how far ``session`` was sent; False when another connection holds it now."""
        kept = await self._sent(keys=[self.keys.session(session.uuid)], args=[session.epoch, session.last])
        return bool(kept)

    async def keep(self, session: RedisSession, ttl_ms: int) -> None:
        try:
            await self._keep(
                keys=[self.keys.session(session.uuid), self.keys.session_frames(session.uuid)],
                args=[session.epoch, ttl_ms],
            )
        except REDIS_FAILURES as exc:
            log.warning("session %s: could not be kept (%s)", session.uuid, exc.__class__.__name__)

    def _wake(self, session_uuid: str) -> None:
        session = self.attached.get(session_uuid)
        if session is not None:
            self._spawn(session.pump())

    def _drop(self, session_uuid: str) -> None:
        session = self.attached.get(session_uuid)
        if session is not None:
            self._spawn(self._verify(session))

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def aclose(self, timeout: float) -> None:
        """Stop the sends that wake-ups started (at shutdown; the sessions live on in Redis)."""
        for task in self._spawned:
            task.cancel()
        if self._spawned:
            await asyncio.wait(set(self._spawned), timeout=timeout)

    async def _verify(self, session: RedisSession) -> None:
        epoch = await self.client.hget(self.keys.session(session.uuid), "epoch")
        if epoch is None or int(cast(str, epoch)) != session.epoch:
            session._lost()

    async def _check(self) -> None:
        """Renew the sessions held here and send anything a lost wake-up left behind."""
        for session in list(self.attached.values()):
            await self.keep(session, self.held_ms)
            await self._verify(session)
            await session.pump()

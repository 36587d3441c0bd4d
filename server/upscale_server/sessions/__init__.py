"""WebSocket sessions: where results are delivered as frames, whether or not a socket is attached.

Runware keeps "undelivered images or tasks in a buffer for 120 seconds": a client that reconnects
with its ``connectionSessionUUID`` gets the results that finished while it was away. A session is
therefore separate from the socket; the transport attaches its socket's sender to a session and the
tasks deliver to the session. ``local.py`` keeps sessions in this process; the cluster's sessions live
in Redis, so a client resumes on any node. Only :mod:`upscale_server.backends` builds them.

A session belongs to the API key that opened it: it is kept under its :func:`session_key`, the UUID
within the key's owner, so another key that names the same UUID opens a session of its own and can
neither take the first one over nor learn that it exists.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

#: Sends one text frame on a socket; raises when the socket is gone.
Sender = Callable[[str], Awaitable[None]]
#: Reads a finished task back as the frame its session gets: (taskUUID, base URL) -> the payload, or
#: None when its record is gone. Sessions that keep references to results (a cluster's) need one.
FrameReader = Callable[[str, str], Awaitable[dict[str, Any] | None]]


def session_key(owner: str, session_uuid: str) -> str:
    """Where the session ``session_uuid`` of ``owner`` is kept (open mode's owner '' keeps the bare UUID)."""
    return f"{owner}:{session_uuid}" if owner else session_uuid


class Session(Protocol):
    """One client session: frames go out through the attached socket, or wait for the next one."""

    @property
    def uuid(self) -> str:
        """The ``connectionSessionUUID`` its client knows."""
        ...

    @property
    def key(self) -> str:
        """Its :func:`session_key`: what the stores, and the jobs that deliver to it, name it by."""
        ...

    async def attach(self, sender: Sender, base_url: str) -> None:
        """Make ``sender`` the session's socket and send it what was kept meanwhile (``base_url``: where
        this socket's client fetches images, for results the session reads back from the records)."""
        ...

    async def detach(self, sender: Sender) -> None:
        """``sender``'s socket closed; keep frames until another attaches (within the resume window)."""
        ...

    async def deliver(self, payload: dict[str, Any]) -> None:
        """Send ``payload`` as one frame now, or keep it for the next socket."""
        ...


class SessionStore(Protocol):
    """Every live session."""

    async def open(self, requested: str | None, owner: str = "") -> Session:
        """The session a new connection of ``owner`` uses: ``requested`` if ``owner`` has it alive (taken
        over from the connection that had it), else a new one."""
        ...

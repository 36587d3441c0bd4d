"""The server's connection bounds, held by the uvicorn protocols it runs.

uvicorn alone holds a connection that trickles its request head forever, and its default HTTP parser
(httptools) accepts headers of any size. So the server runs h11, whose incomplete-event cap bounds the
request head, with one timer added: the head must arrive within ``UPSCALE_HEADER_TIMEOUT_SECONDS`` of
its first byte (or of the connection). uvicorn's ``limit_concurrency`` answers HTTP requests with 503
past ``UPSCALE_MAX_CONNECTIONS`` open connections, but lets WebSocket upgrades through, so the WebSocket
protocol refuses those itself. It also takes frames of at most ``UPSCALE_MAX_UNAUTHENTICATED_BYTES``
(after inflation: the permessage-deflate decoder stops at the limit) until the app has authenticated
the connection and lifts the cap to ``UPSCALE_MAX_FRAME_BYTES`` through :data:`FRAME_LIMIT_EXTENSION`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from upscale_server.config import Settings

log = logging.getLogger(__name__)

#: Key of the WebSocket scope's ``extensions`` holding ``lift(max_bytes)``: called once the connection is
#: authenticated. Absent when the app runs under another server (tests' in-process client).
FRAME_LIMIT_EXTENSION = "upscale.frame_limit"
#: Text messages longer than this reach the app as bytes, decoded by its JSON parser off the event loop.
UNDECODED_TEXT_BYTES = 1 << 20


class HeadTimeoutH11Protocol(H11Protocol):
    """h11 with a deadline on each request head; subclassed per server with ``head_timeout`` set."""

    head_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._stop_head_timer()  # idle between requests is the keep-alive timer's

    def _watch_head(self) -> None:
        """Arm the timer while a request head is awaited and bytes of it came (or none came yet)."""
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self._stop_head_timer()
        elif self._head_timer is None and (self.cycle is None or self.conn.trailing_data[0]):
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request head did not arrive within %g s", self.head_timeout)
            self.transport.close()


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """WebSocket connections capped in number, with small frames until the app authenticates them."""

    max_connections: int | None = None
    unauthenticated_frame_bytes: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn.max_message_size = self.unauthenticated_frame_bytes

    def handle_connect(self, event: Request) -> None:
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            log.warning("refusing a WebSocket connection: %d connections open", len(self.connections) - 1)
            self.handshake_initiated = self.handshake_complete = self.close_sent = True
            self.conn.send_response(self.conn.reject(503, "Too many connections; try again later.\n"))
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
            return
        super().handle_connect(event)
        self.scope["extensions"][FRAME_LIMIT_EXTENSION] = {"lift": self._lift_frame_limit}

    def _lift_frame_limit(self, max_bytes: int) -> None:
        self.conn.max_message_size = max_bytes

    def send_receive_event_to_app(self) -> None:
        """A big text message goes to the app as its UTF-8 bytes: decoding 100 MB into a string here would
        be one pass of some 40 ms on the event loop, and the app's JSON parser reads (and checks) UTF-8
        bytes itself, off the loop and in short steps."""
        if self.curr_msg_data_type == "text" and sum(len(frame) for frame in self.frames) > UNDECODED_TEXT_BYTES:
            self.curr_msg_data_type = "bytes"
        super().send_receive_event_to_app()


def lift_frame_limit(scope: Mapping[str, Any], max_bytes: int) -> None:
    """Let an authenticated connection send frames up to ``max_bytes`` (no-op under another server)."""
    extension = scope.get("extensions", {}).get(FRAME_LIMIT_EXTENSION)
    lift: Callable[[int], None] | None = extension.get("lift") if isinstance(extension, dict) else None
    if lift is not None:
        lift(max_bytes)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn arguments that bound connections, headers and frames for ``settings``."""
    http = type("HTTPProtocol", (HeadTimeoutH11Protocol,), {"head_timeout": settings.header_timeout_seconds})
    ws = type(
        "WebSocketProtocol",
        (BoundedWebSocketProtocol,),
        {
            "max_connections": settings.max_connections,
            "unauthenticated_frame_bytes": min(settings.max_unauthenticated_bytes, settings.max_frame_bytes),
        },
    )
    return {
        "http": http,
        "ws": ws,
        "ws_max_size": settings.max_frame_bytes,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": settings.max_connections,
    }

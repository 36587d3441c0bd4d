"""What the transports share: built once by the app, read by every request."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from upscale_server import json_text
from upscale_server.api.auth import ApiKeys
from upscale_server.api.shape import check_shape
from upscale_server.config import Settings
from upscale_server.inference import ModelInfo
from upscale_server.protocol import parse_request_body
from upscale_server.sessions import SessionStore
from upscale_server.storage import ImageStorage
from upscale_server.tasks.dispatcher import TaskDispatcher


@dataclass(frozen=True)
class ServerContext:
    """The parts the routes need; stored at ``app.state.context`` for the lifespan of the app."""

    settings: Settings
    keys: ApiKeys
    images: ImageStorage
    dispatcher: TaskDispatcher
    sessions: SessionStore
    #: Every model, rescanned on each call (files dropped into the models folder appear): blocking.
    models: Callable[[], tuple[ModelInfo, ...]]

    def base_url(self, connection: Request | WebSocket) -> str:
        """Where clients fetch images: the configured public URL, else the address they used."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        url = connection.base_url
        scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
        return str(url.replace(scheme=scheme)).rstrip("/")


def server_context(connection: Request | WebSocket) -> ServerContext:
    context: ServerContext = connection.app.state.context
    return context


class RunwareJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a reply may echo a client's string, and JSON admits lone surrogates
    that UTF-8 cannot encode (Starlette's own response would fail on them with a 500)."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class PiecewiseJSONResponse(Response):
    """JSON sent as the pieces :func:`json_text.ascii_pieces` made, with its ``Content-Length``: a reply
    carrying a big base64 image is never one ``json.dumps`` or one copy on the event loop."""

    media_type = "application/json"

    def __init__(self, pieces: list[bytes], status_code: int = 200) -> None:
        super().__init__(status_code=status_code)
        self.pieces = pieces
        self.headers["content-length"] = str(sum(len(piece) for piece in pieces))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for index, piece in enumerate(self.pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": index < len(self.pieces) - 1})


async def json_reply(content: object, status_code: int = 200) -> Response:
    """The reply for ``content``: as one body when it is small, else written off the loop in pieces."""
    if not json_text.has_long_strings(content):
        return RunwareJSONResponse(content, status_code=status_code)
    return PiecewiseJSONResponse(await json_text.ascii_pieces(content), status_code=status_code)


def dry_run_requested(value: str | None) -> bool:
    """Whether ``X-Runware-Dry-Run`` (REST) or ``dryRun`` (the WebSocket URL's query) asks for a dry run:
    ``1`` or ``true`` (SDK-JS sends ``dryRun=1``); anything else, or nothing, is a real run."""
    return value is not None and value.strip().lower() in ("1", "true")


#: Bodies above this are parsed in a thread: json.loads of a 50 MB base64 image blocks for a while.
LARGE_BODY = 1 << 20


async def parse_tasks(body: bytes | bytearray | str, settings: Settings) -> list[object]:
    """The task array of a REST body or WebSocket frame (text frames as they came: no copy to bytes on
    the loop), parsed off the event loop when it is big. Its task and value counts are bounded first, so
    a body of millions of tiny values is refused before any of them is built."""
    if len(body) > LARGE_BODY:
        # In a thread, and with the long strings cut out first: json.loads holds the GIL throughout.
        parse = functools.partial(_parse_body, max_tasks=settings.max_tasks)
        return await asyncio.to_thread(json_text.parse_long_strings_apart, body, parse)
    return _parse_body(body, max_tasks=settings.max_tasks)


def _parse_body(body: bytes | bytearray | str, *, max_tasks: int) -> list[object]:
    check_shape(body, max_tasks=max_tasks)
    return parse_request_body(body, max_tasks=max_tasks)

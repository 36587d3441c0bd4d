"""Reading a REST body no further than its key allows.

Until a request's key is accepted it may cost the server only a small, quick read: at most
``UPSCALE_MAX_UNAUTHENTICATED_BYTES``, within ``UPSCALE_HEADER_TIMEOUT_SECONDS``. A body that fits is
read whole and authenticated as always (the leading ``authentication`` task's ``apiKey``, else
``Authorization: Bearer``). A bigger body is judged
from that prefix before another byte is read: its key is the leading authentication task's, when that
task is complete within the prefix, else the header's. A refused key is answered at once; an accepted
one lets the rest of the body be read, up to ``UPSCALE_MAX_BODY_BYTES``, and the whole body is then
authenticated again by the one rule in :mod:`upscale_server.api.auth`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from upscale_server.api.auth import ApiKeys
from upscale_server.errors import PayloadTooLargeError, RequestTimeoutError

_WHITESPACE = " \t\r\n"
_DECODER = json.JSONDecoder()


class BodyReader:
    """Reads one request body in two stages: the unauthenticated prefix, then the rest.

    Chunks are appended to one buffer as they arrive (a ``bytearray`` grows in place): joining a 100 MB
    body at the end would be one copy of about a tenth of a second on the event loop's thread."""

    def __init__(self, stream: AsyncIterator[bytes], *, declared: int | None, limit: int) -> None:
        self._stream = stream
        self._declared = declared
        self._limit = limit
        self.body = bytearray()
        self.complete = False

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"The request body is larger than {self._limit} bytes (UPSCALE_MAX_BODY_BYTES).", max=self._limit
        )

    async def read_until(self, size: int) -> bytearray:
        """The body read so far once it holds more than ``size`` bytes or has ended."""
        if self._declared is not None and self._declared > self._limit:
            raise self._too_large()
        while not self.complete and len(self.body) <= size:
            chunk = await anext(self._stream, None)
            if chunk is None:
                self.complete = True
                break
            if len(self.body) + len(chunk) > self._limit:
                raise self._too_large()
            self.body += chunk
        return self.body


async def read_authenticated_body(
    stream: AsyncIterator[bytes],
    keys: ApiKeys,
    *,
    bearer: str | None,
    declared: int | None,
    max_body_bytes: int,
    max_unauthenticated_bytes: int,
    unauthenticated_timeout: float,
) -> bytearray:
    """The whole body, read past ``max_unauthenticated_bytes`` only once its key is accepted.

    Raises MissingApiKeyError or InvalidApiKeyError (401) for a big body whose key is refused,
    PayloadTooLargeError (413) past ``max_body_bytes``, and RequestTimeoutError (408) when the prefix
    takes longer than ``unauthenticated_timeout`` seconds (a client trickling it holds a connection)."""
    reader = BodyReader(stream, declared=declared, limit=max_body_bytes)
    try:
        async with asyncio.timeout(unauthenticated_timeout):
            prefix = await reader.read_until(max_unauthenticated_bytes)
    except TimeoutError:
        raise RequestTimeoutError(
            f"The first {max_unauthenticated_bytes} bytes of the body (or all of it) did not arrive within "
            f"{unauthenticated_timeout:g} s (UPSCALE_HEADER_TIMEOUT_SECONDS)."
        ) from None
    if reader.complete:
        return prefix  # small: authenticated by the caller with the one rule
    in_body = leading_api_key(bytes(prefix[:max_unauthenticated_bytes]))
    keys.check(in_body if in_body is not None else bearer)
    return await reader.read_until(max_body_bytes)


def leading_api_key(prefix: bytes) -> str | None:
    """The string ``apiKey`` of a leading ``authentication`` task complete within ``prefix``, else None."""
    text = prefix.decode("utf-8", errors="replace")  # the prefix may end inside a character
    start = _skip_whitespace(text, 0)
    if text[start : start + 1] != "[":
        return None
    try:
        task, _ = _DECODER.raw_decode(text, _skip_whitespace(text, start + 1))  # the first element only
    except ValueError:
        return None
    if not isinstance(task, dict) or task.get("taskType") != "authentication":
        return None
    key = task.get("apiKey")
    return key if isinstance(key, str) else None


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos

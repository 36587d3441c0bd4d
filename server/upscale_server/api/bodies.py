"""Parsing a big JSON body without holding the GIL for long.

``json.loads`` of a 76 MB body that is one base64 string is a single C call of several hundred
milliseconds, and it holds the GIL all along: run in a worker thread it still stalls the event loop
(pings, other requests) for that long. Here the long string literals are cut out first, in steps of a
megabyte (``find`` for the quotes, a check and an ASCII decode per piece), ``json.loads`` parses the
small rest, and the strings are put back where they were. Whatever this fast path is not sure of (a
long string with escapes, control characters or non-ASCII text, a literal left unrestored) falls back to
one plain ``json.loads``, so what is accepted and what is refused never changes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import TypeVar

#: String literals longer than this (characters or bytes) are cut out of the body before parsing.
LONG_STRING = 1 << 16
#: Characters handled per step: one C call of a few milliseconds.
_PIECE = 1 << 20
_NOT_PLAIN_BYTES = re.compile(rb'[\x00-\x1f\\"\x80-\xff]')
_NOT_PLAIN_TEXT = re.compile(r'[\x00-\x1f\\"]')

T = TypeVar("T")


def parse_long_strings_apart(body: bytes | bytearray | str, parse: Callable[[bytes | bytearray | str], T]) -> T:
    """``parse(body)`` (a JSON parser), with the long string literals of ``body`` cut out and restored."""
    split = _split(body)
    if split is None:
        return parse(body)
    skeleton, marker, strings = split
    parsed = parse(skeleton)
    restored = _restore(parsed, marker, strings)
    return parsed if restored == len(strings) else parse(body)


def _split(body: bytes | bytearray | str) -> tuple[bytes | bytearray | str, str, list[str]] | None:
    """(the body with each long literal replaced by a marker string, the marker prefix, the literals),
    or None when there is nothing to cut or the fast path does not apply."""
    is_bytes = not isinstance(body, str)
    quote: bytes | str = b'"' if is_bytes else '"'
    backslash: bytes | str = b"\\" if is_bytes else "\\"
    marker = f"\x00long-{uuid.uuid4().hex}-"
    parts: list[bytes | bytearray | str] = []
    strings: list[str] = []
    pos = last = 0
    while (start := body.find(quote, pos)) >= 0:  # type: ignore[arg-type]
        end = start + 1
        while True:
            end = body.find(quote, end)  # type: ignore[arg-type]
            if end < 0:
                return None  # unterminated: json.loads says so
            escapes = 0
            while body[end - 1 - escapes : end - escapes] == backslash:
                escapes += 1
            if escapes % 2 == 0:
                break
            end += 1
        if end - start - 1 > LONG_STRING:
            text = _plain_text(body, start + 1, end)
            if text is None:
                return None
            literal = f'"\\u0000{marker[1:]}{len(strings)}"'
            parts.extend((body[last:start], literal.encode() if is_bytes else literal))
            strings.append(text)
            last = end + 1
        pos = end + 1
    if not strings:
        return None
    parts.append(body[last:])
    skeleton = b"".join(parts) if is_bytes else "".join(parts)  # type: ignore[arg-type]
    return skeleton, marker, strings


def _plain_text(body: bytes | bytearray | str, start: int, stop: int) -> str | None:
    """``body[start:stop]`` as text when it is plain ASCII without escapes or control characters, in pieces."""
    pieces: list[str] = []
    for begin in range(start, stop, _PIECE):
        piece = body[begin : min(begin + _PIECE, stop)]
        if not isinstance(piece, str):
            if _NOT_PLAIN_BYTES.search(piece):
                return None
            pieces.append(piece.decode("ascii"))
        else:
            if not piece.isascii() or _NOT_PLAIN_TEXT.search(piece):
                return None
            pieces.append(piece)
    return "".join(pieces)


def _restore(parsed: object, marker: str, strings: list[str]) -> int:
    """Put the cut-out strings back in place of their markers (values only); returns how many."""
    restored = 0
    stack = [parsed]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)  # type: ignore[assignment]
        else:
            continue
        for key, value in list(items):
            if isinstance(value, str):
                if value.startswith(marker):
                    node[key] = strings[int(value[len(marker) :])]
                    restored += 1
            elif isinstance(value, dict | list):
                stack.append(value)
    return restored

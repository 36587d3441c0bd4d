"""JSON text of replies that carry big strings, made without holding the GIL for long.

``json.dumps`` of a result holding a 35 MB base64 image is one C call of about 0.1 s (it scans every
character for escapes), and it holds the GIL throughout: on the event loop, or even in a worker
thread, it stalls every other connection for that long. Here the long strings that need no escaping
(base64 and data URIs always qualify) are cut out, ``json.dumps`` writes the small rest, and the
strings are put back as pieces of a megabyte, each checked and copied in its own short step. The text
is the same as ``json.dumps(value, separators=(",", ":"))`` gives.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

#: Strings longer than this are written in pieces; shorter ones are left to ``json.dumps``.
LONG_STRING = 1 << 16
#: Characters per piece: checking and copying one is a C call of about a millisecond.
PIECE = 1 << 20
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f\\"]')
_SEPARATORS = (",", ":")


def has_long_strings(value: object) -> bool:
    """Whether ``value`` holds a string value over :data:`LONG_STRING` characters (keys do not count)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if len(node) > LONG_STRING:
                return True
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False


def dump_pieces(value: object, *, ensure_ascii: bool = True, allow_nan: bool = True) -> list[str]:
    """``json.dumps(value, separators=(",", ":"), ensure_ascii=..., allow_nan=...)`` as a list of pieces that
    join to it."""
    marker = f"\x00long-{uuid.uuid4().hex}-"
    strings: list[str] = []
    skeleton = _cut(value, marker, strings)
    if not strings:
        return [json.dumps(value, separators=_SEPARATORS, ensure_ascii=ensure_ascii, allow_nan=allow_nan)]
    text = json.dumps(skeleton, separators=_SEPARATORS, ensure_ascii=ensure_ascii, allow_nan=allow_nan)
    placeholder = re.compile(re.escape(json.dumps(marker)[:-1]) + r'(\d+)"')
    pieces: list[str] = []
    last = 0
    for found in placeholder.finditer(text):
        pieces.append(text[last : found.start() + 1])  # up to and with the opening quote
        string = strings[int(found.group(1))]
        pieces.extend(string[i : i + PIECE] for i in range(0, len(string), PIECE))
        last = found.end() - 1  # from the closing quote
    pieces.append(text[last:])
    return pieces


def dump_text(value: object, *, ensure_ascii: bool = True, allow_nan: bool = True) -> str:
    """``json.dumps(value)`` (compact) for a worker thread: with long strings, in short GIL-holding steps."""
    if not has_long_strings(value):
        return json.dumps(value, separators=_SEPARATORS, ensure_ascii=ensure_ascii, allow_nan=allow_nan)
    return "".join(dump_pieces(value, ensure_ascii=ensure_ascii, allow_nan=allow_nan))


async def dumps(value: object) -> str:
    """``json.dumps(value)`` (compact), in a worker thread and in pieces when ``value`` holds long strings."""
    if not has_long_strings(value):
        return json.dumps(value, separators=_SEPARATORS)
    return await asyncio.to_thread(dump_text, value)


async def ascii_pieces(value: object) -> list[bytes]:
    """The JSON text of ``value`` as ASCII bytes, in pieces of at most about :data:`PIECE` bytes."""
    if not has_long_strings(value):
        return [json.dumps(value, separators=_SEPARATORS).encode("ascii")]
    return await asyncio.to_thread(lambda: [piece.encode("ascii") for piece in dump_pieces(value)])


def _cut(value: object, marker: str, strings: list[str]) -> Any:
    """A copy of ``value`` with each long string that needs no escaping replaced by ``marker`` + its
    index in ``strings``; containers are copied, everything else is shared."""
    if isinstance(value, str):
        if len(value) > LONG_STRING and _plain(value):
            strings.append(value)
            return f"{marker}{len(strings) - 1}"
        return value
    if isinstance(value, dict):
        return {key: _cut(item, marker, strings) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_cut(item, marker, strings) for item in value]
    return value


def _plain(text: str) -> bool:
    """Whether ``json.dumps`` would copy ``text`` unchanged (ASCII, no quote, backslash or control)."""
    for start in range(0, len(text), PIECE):
        piece = text[start : start + PIECE]
        if not piece.isascii() or _NEEDS_ESCAPE.search(piece):
            return False
    return True

"""JSON that carries big strings (base64 images), read and written without holding the GIL for long.

``json.loads`` of a 76 MB body that is one base64 string, or ``json.dumps`` of a result holding a 35 MB
one, is a single C call of a tenth of a second or more, and it holds the GIL throughout: on the event
loop, or even in a worker thread, it stalls every other connection for that long. Both directions
cut the long string literals out first, in steps of a megabyte (a check, and a copy or an ASCII
decode per piece), leave the small rest to the ``json`` module, and put the strings back.

Reading (:func:`parse_long_strings_apart`): whatever the fast path is not sure of (a long string with
escapes, control characters or non-ASCII text, a literal left unrestored) falls back to one plain
``json.loads``, so what is accepted and what is refused never changes. Writing (:func:`dump_pieces`):
only strings that need no escaping (base64 and data URIs always qualify) are cut out, and the text is
the same as ``json.dumps(value, separators=(",", ":"))`` gives.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

#: Strings longer than this are written in pieces; shorter ones are left to ``json.dumps``.
LONG_STRING = 1 << 16
#: Characters per piece: checking and copying one is a C call of about a millisecond.
PIECE = 1 << 20
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f\\"]')
_NOT_PLAIN_BYTES = re.compile(rb'[\x00-\x1f\\"\x80-\xff]')
T = TypeVar("T")
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


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``, with the long strings cut out first when ``text`` is big (a stored result
    holding a base64 image is read back in a worker thread, in short GIL-holding steps)."""
    if len(text) > LONG_STRING:
        return parse_long_strings_apart(text, json.loads)
    return json.loads(text)


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
    return all(_plain_piece(text[start : start + PIECE]) for start in range(0, len(text), PIECE))


def _plain_piece(piece: str) -> bool:
    return piece.isascii() and _NEEDS_ESCAPE.search(piece) is None


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
    for begin in range(start, stop, PIECE):
        piece = body[begin : min(begin + PIECE, stop)]
        if not isinstance(piece, str):
            if _NOT_PLAIN_BYTES.search(piece):
                return None
            pieces.append(piece.decode("ascii"))
        else:
            if not _plain_piece(piece):
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

"""A body's task count and JSON value count, bounded before it is parsed.

``json.loads`` builds every value before anyone can count them: 99 MB of ``[{},{},...]`` become 33
million dicts (gigabytes) before ``len()`` says there were too many tasks. This scan walks the
structural characters outside strings (a regex search per token, ``find`` to skip each string) and
stops as soon as the body holds more tasks than ``max_tasks`` or more JSON values than
``max_tasks * VALUES_PER_TASK``, so refusing such a body costs at most that many steps. Long strings
(a base64 image) are skipped at ``find`` speed. Malformed JSON is left to the parser to describe.
"""

from __future__ import annotations

import re

from upscale_server.errors import PayloadTooLargeError, TooManyTasksError

#: JSON values (objects, arrays and comma-separated members) one task may hold; a Runware task has a
#: few dozen fields at most.
VALUES_PER_TASK = 256

_TOKEN_BYTES = re.compile(rb'["\[\]{},]')
_TOKEN_TEXT = re.compile(r'["\[\]{},]')


def check_shape(body: bytes | bytearray | str, *, max_tasks: int) -> None:
    """Raise TooManyTasksError (more than ``max_tasks`` top-level elements) or PayloadTooLargeError (more
    JSON values than the tasks may hold) without building anything; any other body passes unjudged."""
    is_bytes = not isinstance(body, str)
    token = _TOKEN_BYTES if is_bytes else _TOKEN_TEXT
    quote: bytes | str = b'"' if is_bytes else '"'
    backslash = 0x5C if is_bytes else "\\"
    max_values = max_tasks * VALUES_PER_TASK
    depth = elements = values = 0
    in_array = False
    pos = 0
    while (match := token.search(body, pos)) is not None:  # type: ignore[arg-type]
        char = match.group()
        pos = match.end()
        if char == quote:
            pos = _string_end(body, pos, quote, backslash)
            if pos < 0:
                return  # unterminated: the parser says so
            continue
        if char in (b",", ","):
            values += 1
            if depth == 1 and in_array:
                elements += 1
                if elements >= max_tasks:
                    raise TooManyTasksError(
                        f"The request holds more than {max_tasks} tasks; at most {max_tasks} are accepted in one "
                        "request.",
                        max=max_tasks,
                    )
        elif char in (b"[", b"{", "[", "{"):
            if depth == 0:
                in_array = char in (b"[", "[")  # a lone object is the parser's to refuse
            depth += 1
            values += 1
        else:
            depth -= 1
        if values > max_values:
            raise PayloadTooLargeError(
                f"The request holds more than {max_values} JSON values ({VALUES_PER_TASK} per task at most).",
                max=max_values,
            )


def _string_end(body: bytes | bytearray | str, pos: int, quote: bytes | str, backslash: int | str) -> int:
    """The position after the string literal whose body starts at ``pos``, or -1 when it never ends."""
    while True:
        end = body.find(quote, pos)  # type: ignore[arg-type]
        if end < 0:
            return -1
        escapes = 0
        while end - 1 - escapes >= pos and body[end - 1 - escapes] == backslash:
            escapes += 1
        if escapes % 2 == 0:
            return end + 1
        pos = end + 1

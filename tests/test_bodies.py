"""Big JSON bodies parsed with their long strings cut out: the same result as one json.loads, always."""

from __future__ import annotations

import json
from typing import Any

import pytest

from upscale_server import json_text
from upscale_server.errors import InvalidRequestError
from upscale_server.json_text import parse_long_strings_apart
from upscale_server.protocol import parse_request_body

LONG = "QUJD" * 20_000  # 80,000 base64 characters: above LONG_STRING


def parsed(body: bytes | bytearray | str) -> Any:
    return parse_long_strings_apart(body, parse_request_body)


@pytest.mark.parametrize("form", [bytes, bytearray, str])
@pytest.mark.parametrize(
    "value",
    [
        [{"taskType": "imageUpload", "image": LONG}],
        [{"a": LONG, "b": [LONG + "x", {"c": LONG}], "d": 'q"\\', "e": "\\" * 3 + '"'}],
        [{"single": LONG, "unicode": "\u00e9\u2603"}],
        [{"escaped": LONG[:100] + "\\/" * 40_000}],  # a long string with escapes: the plain path
        [{"accented": LONG + "\u00e9"}],  # non-ASCII in a long string: the plain path
        [{"key" * 30_000: 1}],  # a long key is not cut out
    ],
)
def test_same_result_as_one_json_loads(value: object, form: type) -> None:
    text = json.dumps(value, ensure_ascii=False)
    if "escaped" in text:
        text = text.replace("\\\\/", "\\/")  # JSON's escaped solidus, as PHP writes it
    body: bytes | bytearray | str = text if form is str else form(text.encode())  # a REST body is a bytearray
    assert parsed(body) == parse_request_body(body)


def test_long_strings_are_cut_out_before_json_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def parse(body: bytes | str) -> list[object]:
        seen.append(len(body))
        return parse_request_body(body)

    body = json.dumps([{"image": LONG}, {"image": LONG}]).encode()
    assert parse_long_strings_apart(body, parse) == [{"image": LONG}, {"image": LONG}]
    assert seen and max(seen) < 1000  # json.loads only saw the skeleton

    monkeypatch.setattr(json_text, "PIECE", 7)  # the pieces a long string is checked in change nothing
    assert parse_long_strings_apart(body, parse) == [{"image": LONG}, {"image": LONG}]


@pytest.mark.parametrize(
    "body",
    [
        b'[{"image": "' + LONG.encode() + b"\n" + LONG.encode() + b'"}]',  # a raw control character
        b'[{"image": "' + LONG.encode() + b'"',  # unterminated array
        b'[{"image": "' + LONG.encode(),  # unterminated string
        b'[{"image": "' + LONG.encode() + b'"} junk]',
        b'[{"image": "' + LONG.encode() + b'\xff"}]',  # bad UTF-8
    ],
)
def test_bad_bodies_are_refused_as_json_loads_refuses_them(body: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        parse_request_body(body)
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        parsed(body)

"""Replies with big strings: the same JSON text as ``json.dumps``, written in short steps off the loop."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from upscale_server import json_text
from upscale_server.api.context import PiecewiseJSONResponse, RunwareJSONResponse, json_reply

LONG = "QUJD" * 40_000  # base64-like, 160 000 characters


@pytest.mark.parametrize("ensure_ascii", [True, False])
@pytest.mark.parametrize(
    "value",
    [
        {"data": [{"imageBase64Data": LONG, "taskUUID": "t"}]},
        {"a": [LONG, {"b": LONG + "x"}], "c": 'q"\\', "d": "\u00e9\u2603", "e": None, "f": 1.5},
        {"quoted": LONG + '"'},  # needs escaping: left to json.dumps
        {"accented": LONG + "\u00e9"},
        {"control": LONG[:70_000] + "\n"},
        {"k" * 70_000: "long keys are never cut"},
        {"echo": "\ud800" + LONG},  # a lone surrogate from a client's echo
        [LONG, LONG, LONG],
        {"small": "nothing long"},
    ],
)
def test_same_text_as_json_dumps(value: object, ensure_ascii: bool) -> None:
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=ensure_ascii)
    assert "".join(json_text.dump_pieces(value, ensure_ascii=ensure_ascii)) == expected
    assert json_text.dump_text(value, ensure_ascii=ensure_ascii) == expected
    if ensure_ascii:
        assert asyncio.run(json_text.dumps(value)) == expected
        assert b"".join(asyncio.run(json_text.ascii_pieces(value))) == expected.encode("ascii")


def test_long_strings_are_written_in_pieces_around_a_small_json_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real_dumps = json.dumps

    def dumps(value: object, **kwargs: object) -> str:
        text = real_dumps(value, **kwargs)  # type: ignore[arg-type]
        seen.append(len(text))
        return text

    monkeypatch.setattr(json_text.json, "dumps", dumps)
    monkeypatch.setattr(json_text, "PIECE", 1000)
    pieces = json_text.dump_pieces({"data": [{"imageBase64Data": LONG}, {"imageDataURI": "data:x;base64," + LONG}]})
    monkeypatch.undo()
    assert seen and max(seen) < 1000  # json.dumps only wrote the skeleton
    assert max(len(piece) for piece in pieces) <= 1000
    assert json.loads("".join(pieces))["data"][1]["imageDataURI"].endswith(LONG)


def test_a_reply_with_a_long_string_is_sent_in_pieces_with_its_length() -> None:
    content = {"data": [{"taskType": "imageUpscale", "imageBase64Data": LONG}]}
    reply = asyncio.run(json_reply(content))
    assert isinstance(reply, PiecewiseJSONResponse) and len(reply.pieces) > 1
    assert isinstance(asyncio.run(json_reply({"data": []})), RunwareJSONResponse)

    async def app(scope: object, receive: object, send: object) -> None:
        await reply(scope, receive, send)  # type: ignore[arg-type]

    response = TestClient(app).get("/")  # type: ignore[arg-type]
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.json() == content


@pytest.mark.parametrize("as_bytes", [False, True])
def test_loads_reads_back_what_was_written(as_bytes: bool) -> None:
    """Stored results are read back with the long strings cut out of the text first."""
    value = {"item": {"imageBase64Data": LONG, "echo": "\u00e9" + LONG, "n": [1, 2.5, None, True]}}
    text = json_text.dump_text(value, ensure_ascii=False)
    assert json_text.loads(text.encode() if as_bytes else text) == value
    assert json_text.loads('{"small": 1}') == {"small": 1}

"""What a CI test of your own Runware integration looks like, against a test-target Upscale Server.

Your application code talks to Runware through the official SDK (PyPI ``runware-sdk``); in tests it is
given the URL and key of a local test-target server instead of Runware's cloud. That server answers
like the real one (sizes, formats, alpha, error items) with a fast deterministic resize in place of
the model, so these tests take seconds and need no GPU, no weights and no internet. Run::

    pip install upscale-server runware-sdk pytest
    pytest -p upscale_server.testing examples/test_my_app.py

``-p upscale_server.testing`` loads the plugin that provides the ``upscale_server`` fixture (installed
upscale-server registers it, so the flag is then optional). See docs/test-target.md.
This file needs only the standard library besides the SDK, so it runs wherever the SDK does.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib
from typing import Any

from runware import Runware, RunwareError

# ----------------------------------------------------------------- your application code, unchanged


async def enlarge(client: Runware, png: bytes, factor: int) -> bytes:
    """Your app's feature: upscale a PNG with Runware and get a PNG back."""
    results = await client.run(
        {
            "taskType": "upscale",
            "model": "runware:504@1",  # RealESRGAN_x4plus, on Runware and on Upscale Server
            "inputs": {"image": "data:image/png;base64," + base64.b64encode(png).decode()},
            "upscaleFactor": factor,
            "outputType": "base64Data",
            "outputFormat": "PNG",
        }
    )
    return base64.b64decode(results[0]["imageBase64Data"])


def make_client(api_key: str, base_url: str = "https://api.runware.ai/v1") -> Runware:
    """Production uses Runware's URL; the tests pass the test server's ``rest_url`` instead."""
    # validate=False: validation would fetch Runware's task schemas from the internet.
    return Runware(api_key=api_key, transport="rest", http_base_url=base_url, validate=False)


# ----------------------------------------------------------------- the tests


def make_png(width: int, height: int, *, alpha: bool = False) -> bytes:
    """A solid-colour PNG, written by hand so the example needs no imaging library."""
    pixel = b"\x1e\xa0\x5a\x80" if alpha else b"\x1e\xa0\x5a"
    rows = b"".join(b"\x00" + pixel * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6 if alpha else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_header(png: bytes) -> tuple[int, int, bool]:
    """(width, height, has_alpha) from a PNG's IHDR chunk."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height, _depth, colour_type = struct.unpack(">IIBB", png[16:26])
    return width, height, colour_type in (4, 6)


async def enlarge_with(server: Any, png: bytes, factor: int, api_key: str | None = None) -> bytes:
    client = make_client(api_key or server.api_key, server.rest_url)
    await client.connect()
    try:
        return await enlarge(client, png, factor)
    finally:
        await client.close()


def test_enlarge_doubles_the_size(upscale_server: Any) -> None:
    result = asyncio.run(enlarge_with(upscale_server, make_png(64, 40), factor=2))
    assert png_header(result) == (128, 80, False)


def test_a_transparent_logo_keeps_its_alpha(upscale_server: Any) -> None:
    result = asyncio.run(enlarge_with(upscale_server, make_png(32, 32, alpha=True), factor=4))
    assert png_header(result) == (128, 128, True)


def test_a_wrong_key_is_an_auth_error(upscale_server: Any) -> None:
    try:
        asyncio.run(enlarge_with(upscale_server, make_png(8, 8), factor=2, api_key="not-the-key"))
    except RunwareError as exc:
        assert exc.code == "auth"  # runware-sdk's category for invalidApiKey
    else:
        raise AssertionError("the server must refuse a wrong API key")

"""Image inputs: classifying the four wire forms, decoding base64, and fetching URLs from a real server."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from server.errors import ImageFetchError, ImageTooLargeError, InvalidParameterError, error_item
from server.tasks.inputs import (
    Base64Ref,
    DataUriRef,
    UrlRef,
    UuidRef,
    classify_image_input,
    fetch_url,
)

PNG_1PX_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
PNG_1PX = base64.b64decode(PNG_1PX_B64)
LIMIT = 64 * 1024


# --------------------------------------------------------------------------- classification


def test_uuids_are_references_in_any_case() -> None:
    assert classify_image_input("fd613011-3872-4f37-b4aa-0d343c051a27") == UuidRef(
        "fd613011-3872-4f37-b4aa-0d343c051a27"
    )
    assert classify_image_input(" 019C42A0-C3FF-7138-BE83-EE257ABC5331\n") == UuidRef(
        "019c42a0-c3ff-7138-be83-ee257abc5331"
    )


def test_urls() -> None:
    assert classify_image_input("https://example.com/cat.png") == UrlRef("https://example.com/cat.png")
    assert classify_image_input("HTTP://127.0.0.1:8000/image/a.png?x=1") == UrlRef(
        "HTTP://127.0.0.1:8000/image/a.png?x=1"
    )


@pytest.mark.parametrize(
    "value",
    [
        "ftp://example.com/cat.png",
        "file:///etc/passwd",
        "C:/Users/me/cat.png",
        "https://",
        "javascript:alert(1)",
    ],
)
def test_other_schemes_are_refused(value: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        classify_image_input(value, parameter="inputs.image")
    assert caught.value.parameter == "inputs.image" and caught.value.code == "invalidImage"


def test_data_uri_of_a_real_png_round_trips(clipart_path: Path) -> None:
    png = clipart_path.read_bytes()
    ref = classify_image_input("data:image/png;base64," + base64.b64encode(png).decode())
    assert ref == DataUriRef("image/png", png)


def test_data_uri_details() -> None:
    assert classify_image_input(f"DATA:Image/PNG;base64,{PNG_1PX_B64}") == DataUriRef("image/png", PNG_1PX)
    # The media type is advisory (the decoder sniffs the bytes): odd or empty ones are accepted.
    assert classify_image_input(f"data:;base64,{PNG_1PX_B64}") == DataUriRef("", PNG_1PX)
    assert classify_image_input(f"data:image/png;name=a.png;base64,{PNG_1PX_B64}") == DataUriRef("image/png", PNG_1PX)
    assert "bytes>" in repr(classify_image_input(f"data:image/png;base64,{PNG_1PX_B64}"))  # no payload in logs


def test_raw_base64_tolerates_wrapping_and_missing_padding() -> None:
    assert classify_image_input(PNG_1PX_B64) == Base64Ref(PNG_1PX)
    wrapped = "\n".join(PNG_1PX_B64[i : i + 16] for i in range(0, len(PNG_1PX_B64), 16))
    assert classify_image_input(wrapped) == Base64Ref(PNG_1PX)
    assert classify_image_input(PNG_1PX_B64.rstrip("=")) == Base64Ref(PNG_1PX)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png,rawbytes", "base64-encoded"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64,iVBOR!!", "alphabet"),
        ("iVBORw0KGgo=AAAA", "alphabet"),  # padding in the middle
        ("iVBORw0KGgo===", "alphabet"),  # too much padding
        ("iVBORw0KG", "truncated"),  # 9 characters: no base64 string has this length
        ("iVBORw0KGgo-_", "alphabet"),  # URL-safe alphabet is not accepted
        ("cat.png", "alphabet"),  # a local path: must be uploaded first
    ],
)
def test_bad_inputs_are_refused_with_a_clear_reason(value: str, reason: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        classify_image_input(value, parameter="image")
    assert reason in caught.value.message
    item = error_item(caught.value, task_type="imageUpload", task_uuid=None)
    assert (item["code"], item["parameter"]) == ("invalidImage", "image")


def test_parameter_defaults_to_input_image() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        classify_image_input("")
    assert caught.value.code == "invalidInputImage"


# --------------------------------------------------------------------------- fetch_url


class Handler(BaseHTTPRequestHandler):
    """Routes for the fetch tests. HTTP/1.0: a body without Content-Length ends when the socket closes."""

    def do_GET(self) -> None:
        if self.path == "/ok.png":
            self._send(200, PNG_1PX)
        elif self.path == "/missing":
            self._send(404, b"not here")
        elif self.path == "/empty":
            self._send(200, b"")
        elif self.path == "/declared-too-big":
            self.send_response(200)
            self.send_header("Content-Length", str(LIMIT + 1))
            self.end_headers()
            self.wfile.write(b"x" * 10)  # the client must give up on the header alone
        elif self.path == "/streamed-too-big":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the size is only known by reading
            for _ in range(LIMIT // 1024 + 2):
                self.wfile.write(b"x" * 1024)
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        else:
            self._send(500, b"unknown route")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        return


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def fetch(url: str, *, timeout: float = 5.0) -> bytes:
    async def run() -> bytes:
        async with httpx.AsyncClient() as client:
            return await fetch_url(url, client=client, max_bytes=LIMIT, timeout=timeout, parameter="inputs.image")

    return asyncio.run(run())


def test_fetch_success(base_url: str) -> None:
    assert fetch(f"{base_url}/ok.png") == PNG_1PX


def test_fetch_non_2xx_reports_the_status(base_url: str) -> None:
    with pytest.raises(ImageFetchError) as caught:
        fetch(f"{base_url}/missing")
    assert "404" in caught.value.message
    assert (caught.value.code, caught.value.parameter, caught.value.http_status) == (
        "downloadFailed",
        "inputs.image",
        400,
    )


def test_fetch_empty_body(base_url: str) -> None:
    with pytest.raises(ImageFetchError, match="empty"):
        fetch(f"{base_url}/empty")


@pytest.mark.parametrize("route", ["/declared-too-big", "/streamed-too-big"])
def test_fetch_stops_past_the_limit(base_url: str, route: str) -> None:
    with pytest.raises(ImageTooLargeError) as caught:
        fetch(base_url + route)
    assert str(LIMIT) in caught.value.message and caught.value.parameter == "inputs.image"


def test_fetch_total_timeout(base_url: str) -> None:
    """The server sends a byte every 50 ms, so no single read times out: only the overall deadline fires."""
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="timed out"):
        fetch(f"{base_url}/slow", timeout=0.5)
    assert time.monotonic() - started < 1.8


def test_fetch_network_error() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ImageFetchError) as caught:
        fetch(f"http://127.0.0.1:{port}/x.png")
    assert "ConnectError" in caught.value.message

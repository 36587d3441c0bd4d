"""Webhooks, uploadEndpoint and the outbound address policy, through the real app and real receivers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api_helpers import data_uri, encode, photo_crop, resize_settings, upscale_task
from upscale_server.app import create_app

KEY = "delivery-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records requests and fails the first ``failures`` of them."""

    failures: int = 0
    status_after: int = 200
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    #: While cleared, the first request is held (unanswered) until the test sets it.
    release_first: threading.Event = field(default_factory=threading.Event)
    first_arrived: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.release_first.set()

    def serve(self) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def handle_any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append((self.command, self.path, dict(self.headers), body))
                if len(receiver.requests) == 1:
                    receiver.first_arrived.set()
                    receiver.release_first.wait(30)
                status = 500 if len(receiver.requests) <= receiver.failures else receiver.status_after
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            do_POST = do_PUT = do_GET = handle_any

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    server = found.serve()
    yield found
    server.shutdown()


def make_client(tmp_path: Path, **overrides: Any) -> TestClient:
    settings = resize_settings(tmp_path, api_keys=[KEY], **overrides)
    return TestClient(create_app(settings))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/cat.png",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.5/x.png",
        "http://[::1]/x",
    ],
)
def test_non_public_input_urls_are_refused_by_default(tmp_path: Path, url: str) -> None:
    with make_client(tmp_path) as client:
        task = upscale_task(url)
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 400
        error = response.json()["errors"][0]
        assert (error["code"], error["parameter"], error["taskUUID"]) == (
            "unsupportedAddress",
            "inputImage",
            task["taskUUID"],
        )
        assert "UPSCALE_OUTBOUND_ALLOW" in error["message"]


def test_refused_webhook_is_reported_before_the_task_is_accepted(tmp_path: Path, receiver: Receiver) -> None:
    with make_client(tmp_path) as client:
        task = upscale_task(data_uri(encode(photo_crop())), webhookURL=f"{receiver.url}/hook")
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 400
        assert response.json()["errors"][0]["parameter"] == "webhookURL"
        assert receiver.requests == []
        # the UUID was not used up: the same task without the webhook runs
        del task["webhookURL"]
        assert client.post("/v1", json=[task], headers=AUTH).status_code == 200


def test_input_urls_on_allowed_hosts_are_fetched(tmp_path: Path, receiver: Receiver) -> None:
    image = encode(photo_crop())

    class ImageHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with make_client(tmp_path, outbound_allow=["127.0.0.1"]) as client:
            task = upscale_task(f"http://127.0.0.1:{server.server_address[1]}/cat.png")
            response = client.post("/v1", json=[task], headers=AUTH)
            assert response.status_code == 200, response.text
    finally:
        server.shutdown()


def test_webhook_is_retried_until_delivered_without_delaying_the_reply(tmp_path: Path, receiver: Receiver) -> None:
    receiver.failures = 2  # the first two attempts get HTTP 500
    receiver.release_first.clear()  # and the first is not even answered until the reply is in
    with make_client(tmp_path, outbound_allow=["127.0.0.1"]) as client:
        task = upscale_task(data_uri(encode(photo_crop())), webhookURL=f"{receiver.url}/hook?token=abc")
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 200  # the reply did not wait for the webhook, still held at its first attempt
        assert receiver.first_arrived.wait(30)
        assert len(receiver.requests) == 1
        receiver.release_first.set()
        while len(receiver.requests) < 3:  # the retries (about 1.5 s of backoff; bounded by the test timeout)
            time.sleep(0.05)
    methods = {(method, path) for method, path, _, _ in receiver.requests}
    assert methods == {("POST", "/hook?token=abc")}
    delivered = json.loads(receiver.requests[-1][3])
    assert delivered == response.json()  # the same JSON the API answered


def test_webhook_receives_task_errors_too(tmp_path: Path, receiver: Receiver) -> None:
    with make_client(tmp_path, outbound_allow=["127.0.0.1"]) as client:
        task = upscale_task(
            "6b1d5bd8-0c7b-4bd4-9f93-7f7b07a6d6a1", webhookURL=f"{receiver.url}/hook", deliveryMethod="async"
        )
        assert client.post("/v1", json=[task], headers=AUTH).status_code == 200
        assert receiver.first_arrived.wait(30)
    error = json.loads(receiver.requests[0][3])["errors"][0]
    assert error["code"] == "imageNotFound" and error["taskUUID"] == task["taskUUID"]


def test_upload_endpoint_gets_the_raw_file(tmp_path: Path, receiver: Receiver) -> None:
    with make_client(tmp_path, outbound_allow=["127.0.0.1"]) as client:
        task = upscale_task(
            data_uri(encode(photo_crop())), outputFormat="PNG", uploadEndpoint=f"{receiver.url}/bucket/out.png"
        )
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 200, response.text
        served = client.get(response.json()["data"][0]["imageURL"]).content
    method, path, headers, body = receiver.requests[0]
    assert (method, path) == ("PUT", "/bucket/out.png")
    assert headers["Content-Type"] == "image/png"
    assert body == served


def test_failed_upload_is_a_task_error_and_the_result_is_kept(tmp_path: Path, receiver: Receiver) -> None:
    receiver.status_after = 403
    with make_client(tmp_path, outbound_allow=["127.0.0.1"]) as client:
        task = upscale_task(data_uri(encode(photo_crop())), uploadEndpoint=f"{receiver.url}/expired")
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 400
        error = response.json()["errors"][0]
        assert error["code"] == "uploadFailed" and error["parameter"] == "uploadEndpoint"
        assert "403" in error["message"]
        kept_url = error["message"].rsplit(" at ", 1)[1]
        assert client.get(kept_url).status_code == 200

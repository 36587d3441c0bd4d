"""Webhooks, uploadEndpoint and the outbound address policy, through the real app and real receivers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.api_helpers import data_uri, encode, make_client, photo_crop, upscale_task
from tests.support import http_receiver
from tests.support.http_receiver import Reply, Serve, held, ok, replies

KEY = "delivery-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


serve = http_receiver.serve  # serve(routes) -> a started HttpReceiver, closed after the test


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
    with make_client(tmp_path, KEY) as client:
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


def test_refused_webhook_is_reported_before_the_task_is_accepted(tmp_path: Path, serve: Serve) -> None:
    receiver = serve({"/hook": ok()})
    with make_client(tmp_path, KEY) as client:
        task = upscale_task(data_uri(encode(photo_crop())), webhookURL=receiver.url("/hook"))
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 400
        assert response.json()["errors"][0]["parameter"] == "webhookURL"
        assert receiver.requests == []
        # the UUID was not used up: the same task without the webhook runs
        del task["webhookURL"]
        assert client.post("/v1", json=[task], headers=AUTH).status_code == 200


def test_input_urls_on_allowed_hosts_are_fetched(tmp_path: Path, serve: Serve) -> None:
    receiver = serve({"/cat.png": ok(encode(photo_crop()), "image/png")})
    with make_client(tmp_path, KEY, outbound_allow=["127.0.0.1"]) as client:
        task = upscale_task(receiver.url("/cat.png"))
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 200, response.text
    assert [(r.method, r.path) for r in receiver.requests] == [("GET", "/cat.png")]


def test_webhook_is_retried_until_delivered_without_delaying_the_reply(tmp_path: Path, serve: Serve) -> None:
    first_answer = threading.Event()
    # The first two attempts get HTTP 500, and the first is not even answered until the reply is in.
    receiver = serve({"/hook": replies(held(first_answer, Reply(500)), 500, 200)})
    with make_client(tmp_path, KEY, outbound_allow=["127.0.0.1"]) as client:
        task = upscale_task(data_uri(encode(photo_crop())), webhookURL=receiver.url("/hook?token=abc"))
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 200  # the reply did not wait for the webhook, still held at its first attempt
        receiver.wait_for(1)
        assert receiver.answered == []
        first_answer.set()
        attempts = receiver.wait_for(3)  # the retries, about 1.5 s of backoff
    assert {(r.method, r.path) for r in attempts} == {("POST", "/hook?token=abc")}
    delivered = json.loads(attempts[-1].body)
    assert delivered == response.json(), (delivered, response.json())  # the same JSON the API answered


def test_webhook_receives_task_errors_too(tmp_path: Path, serve: Serve) -> None:
    receiver = serve({"/hook": ok()})
    with make_client(tmp_path, KEY, outbound_allow=["127.0.0.1"]) as client:
        # Base64 that decodes to bytes that are no image: only decoding finds that, after the acknowledgement.
        task = upscale_task("bm90IGFuIGltYWdl", webhookURL=receiver.url("/hook"), deliveryMethod="async")
        assert client.post("/v1", json=[task], headers=AUTH).status_code == 200
        [delivery] = receiver.wait_for(1)
    error = json.loads(delivery.body)["errors"][0]
    assert error["code"] == "invalidImage" and error["taskUUID"] == task["taskUUID"]


def test_upload_endpoint_gets_the_raw_file(tmp_path: Path, serve: Serve) -> None:
    receiver = serve({"/bucket/out.png": ok()})
    with make_client(tmp_path, KEY, outbound_allow=["127.0.0.1"]) as client:
        task = upscale_task(
            data_uri(encode(photo_crop())), outputFormat="PNG", uploadEndpoint=receiver.url("/bucket/out.png")
        )
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 200, response.text
        served = client.get(response.json()["data"][0]["imageURL"]).content
    [upload] = receiver.requests
    assert (upload.method, upload.path) == ("PUT", "/bucket/out.png")
    assert upload.headers["content-type"] == "image/png"
    assert upload.body == served


def test_failed_upload_is_a_task_error_and_the_result_is_kept(tmp_path: Path, serve: Serve) -> None:
    receiver = serve({"/expired": Reply(403)})
    with make_client(tmp_path, KEY, outbound_allow=["127.0.0.1"]) as client:
        task = upscale_task(data_uri(encode(photo_crop())), uploadEndpoint=receiver.url("/expired"))
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 400
        error = response.json()["errors"][0]
        assert error["code"] == "uploadFailed" and error["parameter"] == "uploadEndpoint"
        assert "403" in error["message"]
        kept_url = error["message"].rsplit(" at ", 1)[1]
        assert client.get(kept_url).status_code == 200

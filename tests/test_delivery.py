"""Webhook delivery (retries, give-ups, never blocking) and uploadEndpoint PUTs, against real local receivers.

Backoff waits go through an injected ``sleep`` that records the delay and returns at once, so the
retry tests are exact and fast. The tests about slowness use a receiver that holds its answer until
the test releases it (``tests/support/http_receiver.py``), so "slow" is a state the test controls and
the assertions are about what had happened by then, never about elapsed seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import http_receiver
from tests.support.http_receiver import Reply, Serve, free_port, held, ok
from tests.test_outbound import LOCAL, RecordingTransport, real_transport
from upscale_server import delivery
from upscale_server.delivery import WebhookSender, upload_output
from upscale_server.errors import BlockedAddressError, UploadFailedError
from upscale_server.outbound import OutboundClient, OutboundPolicy

TASK = "6f1c2a9e-4b8d-4c1e-9a55-1f2e3d4c5b6a"
PAYLOAD: dict[str, object] = {
    "data": [
        {
            "taskType": "upscale",
            "taskUUID": TASK,
            "imageUUID": "0b9e3f52-7d4c-4a8e-b1f0-2c3d4e5f6a7b",
            "imageURL": "https://upscale.example/image/0b9e3f52.png",
            "cost": 0.0125,
            "note": "ünïcode ✓",
        }
    ]
}


serve = http_receiver.serve  # serve(routes) -> a started HttpReceiver, closed after the test


class RecordingSleep:
    """Stands in for ``asyncio.sleep``: records each backoff delay, advances a fake clock, yields once."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.now = 0.0

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.now += delay
        await asyncio.sleep(0)

    def clock(self) -> float:
        return self.now


def status_sequence(*statuses: int, headers: dict[str, str] | None = None) -> tuple[Reply, ...]:
    """Answer the n-th request with ``statuses[n-1]`` (the last one repeats)."""
    return http_receiver.replies(*statuses, body=b"receiver says no: SECRET", headers=headers)


def released_at_the_latest_after(seconds: float, gate: threading.Event) -> threading.Timer:
    """A safety net, not a measurement: sets ``gate`` after ``seconds`` so that code which wrongly waits for
    a held receiver ends up delivering (and the test's assertions fail) instead of hanging."""
    timer = threading.Timer(seconds, gate.set)
    timer.daemon = True
    timer.start()
    return timer


class CountingSender(WebhookSender):
    """The sender as the metrics see it: every result it reports through ``on_result``, counted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.results: Counter[str] = Counter()
        super().__init__(*args, on_result=lambda result: self.results.update([result]), **kwargs)

    @property
    def delivered(self) -> int:
        return self.results["delivered"]

    @property
    def retried(self) -> int:
        return self.results["retried"]

    @property
    def given_up(self) -> int:
        return self.results["given_up"]


async def deliver_all(
    urls: list[str], *, policy: OutboundPolicy = LOCAL, transport: RecordingTransport | None = None, **options: object
) -> tuple[CountingSender, RecordingSleep]:
    """Send ``PAYLOAD`` to each URL and wait for every delivery to finish."""
    sleep = RecordingSleep()
    client = OutboundClient(policy, transport=transport or real_transport())
    sender = CountingSender(client, sleep=sleep, clock=sleep.clock, **options)  # type: ignore[arg-type]
    try:
        for url in urls:
            sender.send(url, PAYLOAD, task_uuid=TASK)
        await sender.aclose(timeout=10)
    finally:
        await client.aclose()
    return sender, sleep


# --------------------------------------------------------------------------- retries


def test_retried_on_5xx_then_delivered_with_the_payload_intact(serve: Serve) -> None:
    receiver = serve({"/hook": status_sequence(500, 503, 200)})
    sender, sleep = asyncio.run(deliver_all([receiver.url("/hook?token=abc")]))
    assert len(receiver.requests) == 3  # delivered on the third attempt
    for seen in receiver.requests:
        assert seen.method == "POST" and seen.path == "/hook?token=abc"
        assert seen.headers["content-type"] == "application/json"
        assert json.loads(seen.body) == PAYLOAD
    assert receiver.requests[0].body == receiver.requests[2].body
    assert (sender.delivered, sender.retried, sender.given_up) == (1, 2, 0)
    assert len(sleep.delays) == 2
    assert 0.4 <= sleep.delays[0] < 0.6 and 0.8 <= sleep.delays[1] < 1.2  # 0.5 s, then 1 s, with jitter
    assert sleep.delays[0] < sleep.delays[1]


def test_backoff_doubles_up_to_the_cap_and_respects_retry_after() -> None:
    async def build() -> list[float]:
        client = OutboundClient(LOCAL, transport=real_transport())
        sender = WebhookSender(client, first_delay=0.5, max_delay=30, jitter=lambda: 0.5)  # factor exactly 1
        await client.aclose()
        return [sender.backoff(n) for n in range(1, 10)] + [sender.backoff(1, 7.0), sender.backoff(1, 600.0)]

    assert asyncio.run(build()) == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 7.0, 30]


def test_408_and_429_are_retried_and_retry_after_is_honoured(serve: Serve) -> None:
    receiver = serve(
        {"/throttled": status_sequence(429, 200, headers={"Retry-After": "7"}), "/slow-ack": status_sequence(408, 200)}
    )
    sender, sleep = asyncio.run(
        deliver_all([receiver.url("/throttled"), receiver.url("/slow-ack")], jitter=lambda: 0.5)
    )
    assert sender.delivered == 2 and sender.given_up == 0
    assert sorted(sleep.delays) == [0.5, 7.0]


@pytest.mark.parametrize("status", [400, 401, 404, 410, 301])
def test_other_statuses_give_up_after_one_attempt(serve: Serve, status: int, caplog: pytest.LogCaptureFixture) -> None:
    receiver = serve({"/hook": status_sequence(status)})
    with caplog.at_level(logging.WARNING, logger="upscale_server.delivery"):
        sender, sleep = asyncio.run(deliver_all([receiver.url("/hook?token=secret-token")]))
    assert len(receiver.requests) == 1 and sleep.delays == []
    assert (sender.delivered, sender.retried, sender.given_up) == (0, 0, 1)
    (record,) = [r for r in caplog.records if "given up" in r.getMessage()]
    message = record.getMessage()
    assert TASK in message and f"HTTP {status}" in message and "after 1 attempt" in message
    assert "secret-token" not in message and "SECRET" not in message  # no query string, no receiver body


def test_unreachable_receiver_is_retried_then_given_up(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="upscale_server.delivery"):
        sender, sleep = asyncio.run(deliver_all([f"http://127.0.0.1:{free_port()}/hook"], max_attempts=4))
    assert len(sleep.delays) == 3 and sleep.delays == sorted(sleep.delays)
    assert (sender.delivered, sender.retried, sender.given_up) == (0, 3, 1)
    (record,) = [r for r in caplog.records if "given up" in r.getMessage()]
    assert TASK in record.getMessage() and "no attempts left" in record.getMessage()


def test_give_up_after_bounds_the_retry_window(serve: Serve) -> None:
    receiver = serve({"/hook": status_sequence(503)})
    sender, sleep = asyncio.run(
        deliver_all([receiver.url("/hook")], first_delay=1.0, give_up_after=2.5, jitter=lambda: 0.5)
    )
    # waits 1 s (t=1) and 2 s would end at t=3 > 2.5: given up after the second attempt
    assert sleep.delays == [1.0] and len(receiver.requests) == 2
    assert sender.given_up == 1


def test_refused_address_is_given_up_at_once_without_connecting(caplog: pytest.LogCaptureFixture) -> None:
    transport = RecordingTransport()  # fails the test on any call
    with caplog.at_level(logging.WARNING):
        sender, sleep = asyncio.run(
            deliver_all(["http://169.254.169.254/latest/meta-data/"], policy=OutboundPolicy(), transport=transport)
        )
    assert transport.requests == [] and sleep.delays == []
    assert (sender.given_up, sender.retried) == (1, 0)
    assert any(TASK in r.getMessage() and "link-local" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- never blocking, shutdown


async def until(condition: Callable[[], object], what: str, guard: float = 30.0) -> None:
    """Yield to the event loop until ``condition()`` holds: a state, not a duration. ``guard`` seconds only
    turn a hang into a failure that says what never happened."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + guard
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"still waiting for {what}")
        await asyncio.sleep(0.01)


def test_send_returns_at_once_and_a_slow_receiver_blocks_nothing(serve: Serve) -> None:
    """Proves by the order of events, not by a clock: ``send`` returns before its delivery is answered;
    while a receiver holds its answer, the event loop runs on and another delivery completes; and
    ``aclose`` waits for the held delivery once the receiver answers."""
    release_slow = threading.Event()
    receiver = serve({"/slow": held(release_slow), "/fast": ok()})
    safety = released_at_the_latest_after(30, release_slow)

    async def scenario() -> tuple[WebhookSender, tuple[int, int], tuple[int, int, bool, list[str]]]:
        client = OutboundClient(LOCAL, transport=real_transport())
        sender = CountingSender(client)
        sender.send(receiver.url("/slow"), PAYLOAD, task_uuid=TASK)
        after_send = (sender.delivered, sender.in_flight)
        await until(lambda: receiver.requests, "the slow receiver to get its webhook")
        sender.send(receiver.url("/fast"), PAYLOAD, task_uuid="other-task")
        await until(lambda: sender.delivered, "the fast delivery")
        while_held = (
            sender.delivered,
            sender.in_flight,
            release_slow.is_set(),
            [request.path for request in receiver.answered],
        )
        release_slow.set()
        await sender.aclose(timeout=30)  # waits for the slow delivery, now answered
        await client.aclose()
        return sender, after_send, while_held

    try:
        sender, after_send, while_held = asyncio.run(scenario())
    finally:
        safety.cancel()
    assert after_send == (0, 1)  # send returned with its delivery still to do
    assert while_held == (1, 1, False, ["/fast"])  # delivered while the slow one was held, on the same loop
    assert sender.delivered == 2 and sender.in_flight == 0  # aclose waited for the slow one
    assert [request.path for request in receiver.requests] == ["/slow", "/fast"]
    assert [request.path for request in receiver.answered] == ["/fast", "/slow"]


def test_aclose_cancels_what_outlives_its_timeout(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    never = threading.Event()  # the receiver holds its answer until the test ends
    receiver = serve({"/slow": held(never)})
    safety = released_at_the_latest_after(30, never)

    async def scenario() -> tuple[WebhookSender, bool]:
        client = OutboundClient(LOCAL, transport=real_transport())
        sender = CountingSender(client)
        sender.send(receiver.url("/slow"), PAYLOAD, task_uuid=TASK)
        await until(lambda: receiver.requests, "the receiver to get the webhook")
        await sender.aclose(timeout=0.2)
        still_held = not never.is_set()
        sender.send(receiver.url("/slow"), PAYLOAD, task_uuid="late-task")  # after close: dropped, no raise
        await client.aclose()
        return sender, still_held

    try:
        with caplog.at_level(logging.WARNING):
            sender, still_held = asyncio.run(scenario())
    finally:
        safety.cancel()
    assert still_held, "aclose waited for the receiver instead of cancelling after its timeout"
    assert (sender.delivered, sender.given_up, sender.in_flight) == (0, 2, 0)
    assert len(receiver.requests) == 1 and receiver.answered == []
    messages = [r.getMessage() for r in caplog.records]
    assert any(TASK in m and "cancelled at shutdown" in m for m in messages)
    assert any("late-task" in m and "closed" in m for m in messages)


def test_send_never_raises() -> None:
    async def scenario() -> WebhookSender:
        client = OutboundClient(LOCAL, transport=real_transport())
        sender = CountingSender(client)
        sender.send("http://127.0.0.1:9/hook", {"data": {1, 2}}, task_uuid=TASK)  # a set is not JSON
        sender.send("http://127.0.0.1:9/hook", {"data": [float("nan")]}, task_uuid=TASK)  # nor is NaN
        await client.aclose()
        return sender

    sender = asyncio.run(scenario())
    assert sender.given_up == 2 and sender.in_flight == 0
    outside = CountingSender(OutboundClient(LOCAL, transport=real_transport()))
    outside.send("http://127.0.0.1:9/hook", PAYLOAD, task_uuid=TASK)  # no running loop
    assert outside.given_up == 1


def test_sender_rejects_bad_settings() -> None:
    client = OutboundClient(LOCAL, transport=real_transport())
    with pytest.raises(ValueError, match="max_attempts"):
        WebhookSender(client, max_attempts=0)
    with pytest.raises(ValueError, match="first_delay"):
        WebhookSender(client, first_delay=5, max_delay=1)


# --------------------------------------------------------------------------- uploadEndpoint


def test_upload_puts_the_raw_bytes_with_the_content_type(serve: Serve) -> None:
    receiver = serve({"/bucket/out.png": ok(b"")})
    data = os.urandom(300_000) + bytes(range(256))

    async def upload() -> None:
        client = OutboundClient(LOCAL, transport=real_transport())
        try:
            await upload_output(client, receiver.url("/bucket/out.png?X-Amz-Signature=abc"), data, "image/png")
        finally:
            await client.aclose()

    asyncio.run(upload())
    (seen,) = receiver.requests
    assert (seen.method, seen.path) == ("PUT", "/bucket/out.png?X-Amz-Signature=abc")
    assert seen.headers["content-type"] == "image/png"
    assert seen.headers["content-length"] == str(len(data))
    assert seen.body == data


def upload_error(url: str, *, policy: OutboundPolicy = LOCAL, transport: RecordingTransport | None = None) -> Exception:
    async def upload() -> Exception:
        client = OutboundClient(policy, transport=transport or real_transport())
        try:
            await upload_output(client, url, b"image bytes", "image/jpeg")
        except Exception as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("the upload should have failed")

    return asyncio.run(upload())


def test_upload_403_fails_the_task_with_the_status(serve: Serve) -> None:
    receiver = serve({"/bucket/out.jpg": status_sequence(403)})
    error = upload_error(receiver.url("/bucket/out.jpg"))
    assert isinstance(error, UploadFailedError)
    assert (error.code, error.http_status, error.parameter) == ("uploadFailed", 400, "uploadEndpoint")
    assert "HTTP 403" in error.message and f"127.0.0.1:{receiver.port}" in error.message
    assert "SECRET" not in error.message  # the receiver's body is never echoed
    assert len(receiver.requests) == 1  # no retry


def test_upload_network_error_fails_the_task() -> None:
    error = upload_error(f"http://127.0.0.1:{free_port()}/bucket/out.jpg")
    assert isinstance(error, UploadFailedError) and "could not connect" in error.message


def test_upload_to_a_refused_address_never_connects() -> None:
    transport = RecordingTransport()
    error = upload_error("http://10.0.0.7/bucket/out.jpg", policy=OutboundPolicy(), transport=transport)
    assert isinstance(error, BlockedAddressError) and error.parameter == "uploadEndpoint"
    assert transport.requests == []


def test_a_big_base64_result_is_encoded_off_the_loop_and_sent_as_it_was(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoding a 35 MB base64 result is about 0.1 s: done in a worker thread, on a copy taken at send
    time, so a caller that changes its dict afterwards changes nothing; a payload that is not JSON is
    given up there too."""
    receiver = serve({"/hook": status_sequence(200)})
    payload = {"data": [{"taskUUID": TASK, "imageBase64Data": "QUJD" * 40_000, "cost": 0.1}]}
    expected = json.dumps(payload, separators=(",", ":")).encode()
    threads: list[bool] = []
    real_encode = delivery.encode_json

    def encode(value: Any) -> bytes:
        threads.append(threading.current_thread() is threading.main_thread())
        return real_encode(value)

    monkeypatch.setattr(delivery, "encode_json", encode)

    async def scenario() -> CountingSender:
        client = OutboundClient(LOCAL, transport=real_transport())
        sender = CountingSender(client)
        sender.send(receiver.url("/hook"), payload, task_uuid=TASK)
        payload["data"][0]["cost"] = 99  # after send: not what is delivered
        sender.send(receiver.url("/hook"), {"data": [{"x": "A" * 70_000, "y": {1, 2}}]}, task_uuid=TASK)
        await sender.aclose(timeout=10)
        await client.aclose()
        return sender

    sender = asyncio.run(scenario())
    assert [seen.body for seen in receiver.requests] == [expected]
    assert threads == [False, False]  # both encoded in a worker thread
    assert (sender.delivered, sender.given_up) == (1, 1)

"""Getting results out: ``webhookURL`` POSTs and ``uploadEndpoint`` PUTs, both through ``OutboundClient``.

Webhooks follow the terminal-webhook policy of Replicate's cog: retry only what a resend can
fix (transport errors, 408, 429, 5xx) with bounded exponential backoff, give up at once on anything
else. Each delivery is its own asyncio task, so a slow or dead receiver delays nothing but itself.
Uploads are part of the task: a failed one fails the task, so the client learns its result did not
arrive where it asked.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from upscale_server import json_text
from upscale_server.errors import BlockedAddressError, UploadFailedError
from upscale_server.outbound import OutboundClient, OutboundError, encode_json, origin

log = logging.getLogger(__name__)

#: Statuses a resend may fix: the receiver timed out, throttled us, or failed on its side.
_RETRY_STATUSES = frozenset({408, 429})


async def upload_output(client: OutboundClient, url: str, data: bytes, content_type: str) -> None:
    """PUT ``data`` to ``url`` as the raw body with ``content_type``, once.

    Raises ``UploadFailedError`` (message with the HTTP status, or what went wrong on the network)
    and ``BlockedAddressError`` when the policy refuses the URL or one of its redirects.
    """
    parameter = "uploadEndpoint"
    try:
        response = await client.put_bytes(url, data, content_type=content_type, parameter=parameter)
    except OutboundError as exc:
        raise UploadFailedError(
            f"Uploading the result to uploadEndpoint ({exc.host}) failed: {exc.reason}.", parameter=parameter
        ) from exc
    if not response.is_success:
        host = response.request.headers.get("host", origin(url))
        hint = " (an expired or mis-signed presigned URL?)" if response.status_code in (401, 403) else ""
        raise UploadFailedError(
            f"Uploading the result to uploadEndpoint ({host}) failed: the server answered HTTP "
            f"{response.status_code}{hint}.",
            parameter=parameter,
        )


# --------------------------------------------------------------------------- webhooks


class _Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give up"


@dataclass(frozen=True, slots=True)
class _Attempt:
    verdict: _Verdict
    detail: str
    retry_after: float | None = None


class WebhookSender:
    """Delivers webhook payloads in the background, with bounded retries.

    ``send`` returns at once and never raises; the delivery runs as its own task. Attempt ``n``
    failing retryably waits ``first_delay * 2**(n-1)`` seconds, times a jitter factor in [0.8, 1.2)
    (so receivers are not hit in lockstep, yet each wait is longer than the last until the cap),
    capped at ``max_delay``; a numeric ``Retry-After`` on 429/503 lengthens the wait up to the cap.
    A delivery stops after ``max_attempts`` attempts, or when the next wait would end more than
    ``give_up_after`` seconds after the first attempt began. Each request is bounded by the
    client's policy timeout. ``sleep``, ``clock`` and ``jitter`` are injectable for tests.
    """

    def __init__(
        self,
        client: OutboundClient,
        *,
        max_attempts: int = 8,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        give_up_after: float = 300.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        on_result: Callable[[str], None] = lambda result: None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        if first_delay < 0 or max_delay < first_delay or give_up_after < 0:
            raise ValueError("need 0 <= first_delay <= max_delay and give_up_after >= 0")
        self._client = client
        self.max_attempts = max_attempts
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.give_up_after = give_up_after
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._on_result = on_result  # "delivered", "retried" or "given_up" (the metrics count them)

    @property
    def in_flight(self) -> int:
        """Deliveries still running (sending, or waiting to retry)."""
        return len(self._tasks)

    def send(self, url: str, payload: Mapping[str, object], *, task_uuid: str) -> None:
        """Deliver ``payload`` (the API's answer for the task) to ``url`` in the background.

        The payload is encoded now, so a caller that reuses its dict afterwards changes nothing.
        Never raises: a payload that is not JSON, a call after :meth:`aclose`, or a call with no
        running event loop is logged (with the task UUID) and counted as given up.
        """
        try:
            if self._closed:
                raise RuntimeError("the webhook sender is closed (the server is shutting down)")
            if json_text.has_long_strings(payload):
                # A base64 result is some 0.1 s of encoding: not on the event loop. The containers are
                # copied now (the strings are shared: they cannot change), so the caller's dict may change.
                work = self._encode_and_deliver(url, copy.deepcopy(dict(payload)), task_uuid)
            else:
                work = self._deliver(url, encode_json(payload), task_uuid)
            task = asyncio.get_running_loop().create_task(work, name=f"webhook {task_uuid}")
        except Exception as exc:
            self._on_result("given_up")
            log.error("webhook for task %s to %s not sent: %s", task_uuid, origin(url), exc)
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self, timeout: float) -> None:
        """Refuse new deliveries, wait up to ``timeout`` s for those in flight, then cancel the rest.

        A cancelled delivery is logged as given up with its task UUID.
        """
        self._closed = True
        pending = set(self._tasks)
        if not pending:
            return
        _, unfinished = await asyncio.wait(pending, timeout=timeout)
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.gather(*unfinished, return_exceptions=True)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait after failed attempt number ``attempt`` (1-based)."""
        delay = self.first_delay * 2.0 ** (attempt - 1) * (0.8 + 0.4 * self._jitter())
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_delay)

    async def _encode_and_deliver(self, url: str, payload: Mapping[str, object], task_uuid: str) -> None:
        try:
            body = await asyncio.to_thread(encode_json, payload)
        except Exception as exc:
            self._on_result("given_up")
            log.error("webhook for task %s to %s not sent: %s", task_uuid, origin(url), exc)
            return
        await self._deliver(url, body, task_uuid)

    async def _deliver(self, url: str, body: bytes, task_uuid: str) -> None:
        target = origin(url)  # never the path or query: webhook URLs carry tokens there
        started = self._clock()
        attempt = 0
        try:
            while True:
                attempt += 1
                outcome = await self._attempt(url, body, task_uuid)
                if outcome.verdict is _Verdict.DELIVERED:
                    self._on_result("delivered")
                    log.info("webhook for task %s delivered to %s (attempt %d)", task_uuid, target, attempt)
                    return
                if outcome.verdict is _Verdict.GIVE_UP:
                    self._give_up(task_uuid, target, attempt, outcome.detail)
                    return
                if attempt >= self.max_attempts:
                    self._give_up(task_uuid, target, attempt, f"{outcome.detail}; no attempts left")
                    return
                delay = self.backoff(attempt, outcome.retry_after)
                if self._clock() + delay - started > self.give_up_after:
                    self._give_up(
                        task_uuid, target, attempt, f"{outcome.detail}; retry window of {self.give_up_after:g} s over"
                    )
                    return
                log.info(
                    "webhook for task %s to %s failed (%s); retrying in %.1f s",
                    task_uuid,
                    target,
                    outcome.detail,
                    delay,
                )
                self._on_result("retried")
                await self._sleep(delay)
        except asyncio.CancelledError:
            self._give_up(task_uuid, target, attempt, "cancelled at shutdown")
            raise

    async def _attempt(self, url: str, body: bytes, task_uuid: str) -> _Attempt:
        try:
            response = await self._client.request(
                "POST", url, content=body, content_type="application/json", parameter="webhookURL"
            )
        except BlockedAddressError as exc:
            return _Attempt(_Verdict.GIVE_UP, exc.message)
        except OutboundError as exc:
            return _Attempt(_Verdict.RETRY if exc.retryable else _Verdict.GIVE_UP, exc.reason)
        except Exception:  # a bug must not kill the task silently, nor be retried forever
            log.exception("unexpected failure sending the webhook for task %s", task_uuid)
            return _Attempt(_Verdict.GIVE_UP, "unexpected error (logged)")
        status = response.status_code
        if response.is_success:
            return _Attempt(_Verdict.DELIVERED, f"HTTP {status}")
        if status in _RETRY_STATUSES or status >= 500:
            return _Attempt(_Verdict.RETRY, f"HTTP {status}", _retry_after(response.headers.get("retry-after")))
        return _Attempt(_Verdict.GIVE_UP, f"HTTP {status}")

    def _give_up(self, task_uuid: str, target: str, attempts: int, reason: str) -> None:
        self._on_result("given_up")
        log.warning("webhook for task %s to %s given up after %d attempt(s): %s", task_uuid, target, attempts, reason)


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds; the HTTP-date form is ignored (backoff applies instead)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())

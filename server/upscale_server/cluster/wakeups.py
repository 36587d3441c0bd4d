"""A node's wake-ups: one pub/sub channel per node, and a periodic check behind it.

Pub/sub is only a signal, never the data: a message that is lost (the subscription broke, Redis
restarted) costs at most one check interval, because every waiter and session is also checked
periodically against the state in Redis. Messages are ``<verb> <argument>`` (``done <taskUUID>``,
``sess <sessionUUID>``, ``drop <sessionUUID>``); each verb has one handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio

log = logging.getLogger(__name__)

Handler = Callable[[str], None]
Check = Callable[[], Awaitable[None]]

#: Seconds between attempts to subscribe again after the connection broke.
RESUBSCRIBE_SECONDS = 0.5
#: Seconds :meth:`Wakeups.aclose` waits for its tasks to end.
CLOSE_TIMEOUT = 2.0


class Wakeups:
    """Listens on ``channel`` and runs ``checks`` every ``interval`` seconds, until :meth:`aclose`."""

    def __init__(self, client: redis.asyncio.Redis, channel: str, *, interval: float) -> None:
        self.client = client
        self.channel = channel
        self.interval = interval
        self._handlers: dict[str, Handler] = {}
        self._checks: list[Check] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: redis.asyncio.client.PubSub | None = None
        self.subscribed = asyncio.Event()

    def on(self, verb: str, handler: Handler) -> None:
        self._handlers[verb] = handler

    def every_interval(self, check: Check) -> None:
        self._checks.append(check)

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._listen(), name="wake-up listener"),
                asyncio.create_task(self._check_forever(), name="periodic check"),
            ]

    async def aclose(self) -> None:
        """Stop listening and checking. Bounded: a cancelled Redis call that does not end promptly (a
        connection stuck mid-reply) must not hold a shutdown."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=2 * CLOSE_TIMEOUT)
            for task in pending:
                log.warning("wake-up task %s did not stop within %.0f s", task.get_name(), 2 * CLOSE_TIMEOUT)
        self._tasks = []

    async def _listen(self) -> None:
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            self._pubsub = pubsub
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._dispatch(str(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the subscription broke: the periodic check covers the gap
                self.subscribed.clear()
                log.warning("wake-up channel lost (%s); subscribing again", exc.__class__.__name__)
                await asyncio.sleep(RESUBSCRIBE_SECONDS)
            finally:
                # Bounded, and run even while this task is being cancelled: a connection stuck mid-reply
                # must not keep the listener (and the shutdown waiting for it) alive.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), CLOSE_TIMEOUT)  # type: ignore[no-untyped-call]

    def _dispatch(self, data: str) -> None:
        verb, _, argument = data.partition(" ")
        handler = self._handlers.get(verb)
        if handler is None:
            log.debug("ignored wake-up %r", data)
            return
        try:
            handler(argument)
        except Exception:
            log.exception("wake-up %r failed", data)

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for check in self._checks:
                try:
                    await check()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("periodic check failed (%s); next in %.1f s", exc.__class__.__name__, self.interval)

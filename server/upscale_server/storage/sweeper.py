"""The background sweeper: deletes expired images and task results every ``interval`` seconds.

It runs as an asyncio task in the app's lifespan and does the blocking work in a worker thread. A
failing sweep is logged and retried at the next tick: a sweeper that dies silently fills the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

logger = logging.getLogger(__name__)


class Sweepable(Protocol):
    """Anything with a ``sweep`` that deletes what expired and returns how much it deleted."""

    def sweep(self, now: float | None = None) -> int: ...


async def sweep_forever(stores: Sequence[Sweepable], interval: float, *, stop: asyncio.Event) -> None:
    """Sweep every store now, then every ``interval`` seconds, until ``stop`` is set.

    Sweeping first at start-up clears whatever expired while the server was down. Returns promptly once
    ``stop`` is set (after the sweep in progress, if any); cancelling the task also ends it.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    while not stop.is_set():
        for store in stores:
            try:
                removed = await asyncio.to_thread(store.sweep)
            except Exception:
                logger.exception("Sweeping %s failed; retrying in %.0f s", type(store).__name__, interval)
            else:
                logger.debug("Swept %d expired entries from %s", removed, type(store).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)

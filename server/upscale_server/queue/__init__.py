"""The job queue: accepted upscale tasks on their way to a worker, and their outcomes on the way back.

The queue is also where admission lives, because it knows how much accepted work is open: an
upscale task first takes a place in it (:meth:`JobQueue.admit`: a full queue is a 429 before
anything is acknowledged), is then claimed, and is handed over as an :class:`UpscaleJob`, plain data
that says everything a worker needs. The queue runs the job through the executor it was started
with, resolves the submitter's future with the outcome, and frees the job's place when it ends,
whatever happened. Today's implementation (``local.py``) runs jobs in this process; only
:mod:`upscale_server.backends` builds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Protocol

from upscale_server.protocol import Outcome, UpscaleTask


@dataclass(frozen=True, slots=True)
class UpscaleJob:
    """An accepted upscale task: the parsed task and the base URL its image URLs are built on."""

    task: UpscaleTask
    base_url: str


Executor = Callable[[UpscaleJob], Coroutine[object, object, Outcome]]


class JobQueue(Protocol):
    """Where accepted jobs wait for a worker, and how many may be open at once."""

    def start(self, execute: Executor) -> None:
        """Run queued jobs with ``execute`` (which records the outcome and notifies) from now on."""
        ...

    def admit(self) -> None:
        """Take a place for one more job; QueueFullError (429) when every place is taken."""
        ...

    def release(self) -> None:
        """Give back a place taken by :meth:`admit` for a task that will not be submitted after all."""
        ...

    def submit(self, job: UpscaleJob) -> asyncio.Future[Outcome]:
        """Queue ``job`` in the place admitted for it; the future resolves with its outcome and the place
        is freed when the job ends. Never raises: the job is already accepted."""
        ...

    @property
    def in_flight(self) -> int:
        """Places taken: jobs admitted and not finished (claiming, queued or running)."""
        ...

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the jobs still running, at shutdown."""
        ...

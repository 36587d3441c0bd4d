"""The job queue: accepted upscale tasks on their way to a worker, and their outcomes on the way back.

An upscale task is accepted (admitted and claimed) by the API and then handed over as an
:class:`UpscaleJob`, plain data that says everything a worker needs. The queue runs it through the
executor it was started with and resolves the submitter's future with the outcome; the submitter
replies with it (sync) or has already answered with an acknowledgement (async). Today's
implementation (``local.py``) runs jobs in this process; only :mod:`upscale_server.backends` builds it.
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
    """Where accepted jobs wait for a worker. Admission happened before (one place: the task records)."""

    def start(self, execute: Executor) -> None:
        """Run queued jobs with ``execute`` (which records the outcome and notifies) from now on."""
        ...

    def submit(self, job: UpscaleJob) -> asyncio.Future[Outcome]:
        """Queue ``job``; the future resolves with its outcome. Never raises: the job is already accepted."""
        ...

    @property
    def in_flight(self) -> int:
        """Jobs submitted here and not finished."""
        ...

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the jobs still running, at shutdown."""
        ...

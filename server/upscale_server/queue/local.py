"""The in-process job queue: every job runs as an asyncio task of this process.

Nothing waits in a list here. Admission bounds how many jobs can be open (``capacity``,
``UPSCALE_MAX_QUEUE``), and the inference worker behind the executor queues the device work itself;
this queue counts the places, starts each job, keeps it alive until it ends (so shutdown can wait
for it) and hands its outcome back. Everything happens on the event loop: no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging

from upscale_server.errors import QueueFullError
from upscale_server.protocol import Outcome
from upscale_server.queue import Executor, UpscaleJob

log = logging.getLogger(__name__)


class LocalJobQueue:
    """Runs submitted jobs in this process, concurrently, with the executor given to :meth:`start`."""

    def __init__(self, *, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._places = 0
        self._execute: Executor | None = None
        self._running: set[asyncio.Task[Outcome]] = set()

    def start(self, execute: Executor) -> None:
        self._execute = execute

    def admit(self) -> None:
        if self._places >= self.capacity:
            raise QueueFullError(
                f"{self._places} upscale tasks are already queued or running "
                f"(UPSCALE_MAX_QUEUE={self.capacity}); retry shortly"
            )
        self._places += 1

    def release(self) -> None:
        if self._places <= 0:
            raise RuntimeError("released a place that was never taken")
        self._places -= 1

    def submit(self, job: UpscaleJob) -> asyncio.Future[Outcome]:
        if self._execute is None:
            raise RuntimeError("the job queue was not started")
        # create_task copies the caller's context: the job's log lines keep its taskUUID.
        task = asyncio.get_running_loop().create_task(self._execute(job), name=f"upscale {job.task.task_uuid}")
        self._running.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Outcome]) -> None:
        self._running.discard(task)
        self.release()  # whatever became of the job, its place is free again

    @property
    def in_flight(self) -> int:
        return self._places

    async def drain(self, timeout: float) -> None:
        if self._running:
            log.info("waiting up to %.0f s for %d running task(s)", timeout, len(self._running))
            await asyncio.wait(set(self._running), timeout=timeout)

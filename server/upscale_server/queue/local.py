"""The in-process job queue: every job runs as an asyncio task of this process.

Nothing waits in a list here. Admission already bounded how many jobs can be open, and the
inference worker behind the executor queues the device work itself; this queue only starts each
job, keeps it alive until it ends (so shutdown can wait for it), and hands its outcome back.
"""

from __future__ import annotations

import asyncio
import logging

from upscale_server.protocol import Outcome
from upscale_server.queue import Executor, UpscaleJob

log = logging.getLogger(__name__)


class LocalJobQueue:
    """Runs submitted jobs in this process, concurrently, with the executor given to :meth:`start`."""

    def __init__(self) -> None:
        self._execute: Executor | None = None
        self._running: set[asyncio.Task[Outcome]] = set()

    def start(self, execute: Executor) -> None:
        self._execute = execute

    def submit(self, job: UpscaleJob) -> asyncio.Future[Outcome]:
        if self._execute is None:
            raise RuntimeError("the job queue was not started")
        # create_task copies the caller's context: the job's log lines keep its taskUUID.
        task = asyncio.get_running_loop().create_task(self._execute(job), name=f"upscale {job.task.task_uuid}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def drain(self, timeout: float) -> None:
        if self._running:
            log.info("waiting up to %.0f s for %d running task(s)", timeout, len(self._running))
            await asyncio.wait(set(self._running), timeout=timeout)

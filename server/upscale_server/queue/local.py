"""The in-process job queue: every job runs as an asyncio task of this process.

Nothing waits in a list here. Admission bounds how many jobs can be open (``capacity``,
``UPSCALE_MAX_QUEUE``), and the inference worker behind the executor queues the device work itself;
this queue counts the places, claims the task in the task records, starts each job, keeps it alive
until it ends (so shutdown can wait for it) and hands its outcome back. Everything happens on the
event loop: no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging

from upscale_server.errors import ConflictTaskUUIDError, QueueFullError
from upscale_server.protocol import Outcome
from upscale_server.queue import Executor, UpscaleJob
from upscale_server.storage import TaskRecords

log = logging.getLogger(__name__)


class LocalJobQueue:
    """Runs enqueued jobs in this process, concurrently, with the executor given to :meth:`start`."""

    def __init__(self, records: TaskRecords, *, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.records = records
        self.capacity = capacity
        self._places = 0
        self._execute: Executor | None = None
        self._running: set[asyncio.Task[Outcome]] = set()

    def start(self, execute: Executor, give_up: Executor) -> None:
        """``give_up`` is never needed here: a job that crashes this process takes the queue with it."""
        self._execute = execute

    async def enqueue(self, job: UpscaleJob) -> asyncio.Future[Outcome | None]:
        if self._execute is None:
            raise RuntimeError("the job queue was not started")
        task = job.task
        if self._places >= self.capacity:
            raise QueueFullError(
                f"{self._places} upscale tasks are already queued or running "
                f"(UPSCALE_MAX_QUEUE={self.capacity}); retry shortly"
            )
        self._places += 1  # taken before the claim's await: concurrent requests see it
        try:
            claimed = await asyncio.to_thread(
                self.records.claim, task.task_uuid, task.task_type, task.delivery_method, job.owner
            )
        except BaseException:
            self._places -= 1
            raise
        if not claimed:
            self._places -= 1
            raise ConflictTaskUUIDError.for_task(task.task_uuid)
        # create_task copies the caller's context: the job's log lines keep its taskUUID.
        running = asyncio.get_running_loop().create_task(self._execute(job), name=f"upscale {task.task_uuid}")
        self._running.add(running)
        running.add_done_callback(self._finished)
        return running  # type: ignore[return-value]  # a Task[Outcome] is a Future[Outcome | None]

    def _finished(self, task: asyncio.Task[Outcome]) -> None:
        self._running.discard(task)
        self._places -= 1  # whatever became of the job, its place is free again

    @property
    def in_flight(self) -> int:
        return self._places

    async def drain(self, timeout: float) -> None:
        if self._running:
            log.info("waiting up to %.0f s for %d running task(s)", timeout, len(self._running))
            await asyncio.wait(set(self._running), timeout=timeout)

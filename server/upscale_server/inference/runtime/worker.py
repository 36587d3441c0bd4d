"""The inference worker: the threads that own the device and drain a bounded job queue.

The API never calls the network itself. It submits a job and awaits the job's future; the worker
runs ``concurrency`` jobs at a time (1 by default: the network already uses every core or the whole
GPU), so a burst of requests queues here instead of fighting over memory. More than one is useful
with cross-request batching on a GPU, where concurrent jobs' tiles share one network pass. Every
future is resolved exactly once, on every path: success, failure, shutdown, or the worker threads dying.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from upscale_server.errors import InternalError, ServiceUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Job(Generic[T]):
    """A unit of device work: ``run`` is called on a worker thread; ``label`` names it in logs."""

    run: Callable[[], T]
    label: str
    future: Future[T] = field(default_factory=Future)
    #: The submitter's context, so the job runs as if called where it was submitted (its taskUUID
    #: reaches the worker's log lines), as ``asyncio.to_thread`` does for its threads.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


class InferenceWorker:
    """Runs submitted jobs on ``concurrency`` threads, oldest first.

    The queue itself is unbounded: what may wait is decided once, by the task lifecycle's admission,
    before a task is acknowledged. One condition guards the queue, the state and the counters, so a
    job is either waiting, running or resolved, never lost between them.
    """

    def __init__(
        self, *, concurrency: int = 1, name: str = "inference-worker", thread_init: Callable[[], None] | None = None
    ) -> None:
        """``thread_init`` runs first on each worker thread (``torch.cuda.set_device``: per thread)."""
        self._thread_init = thread_init
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self._jobs: deque[Job[Any]] = deque()
        self._cond = threading.Condition()
        self._state = WorkerState.STARTING
        self._alive = 0
        names = [name] if concurrency == 1 else [f"{name}-{i}" for i in range(concurrency)]
        self._threads = [threading.Thread(target=self._loop, name=n, daemon=True) for n in names]

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def queue_depth(self) -> int:
        """Jobs accepted and not started yet."""
        return len(self._jobs)

    def start(self) -> None:
        with self._cond:
            self._state = WorkerState.RUNNING
            self._alive = len(self._threads)
        for thread in self._threads:
            thread.start()

    def submit(self, run: Callable[[], T], *, label: str) -> Future[T]:
        """Queue ``run``; ServiceUnavailableError once the worker is stopping."""
        job: Job[T] = Job(run, label)
        with self._cond:
            if self._state is not WorkerState.RUNNING:
                raise ServiceUnavailableError("the server is shutting down and takes no new work")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def stop(self, grace_seconds: float) -> None:
        """Stop taking work, let queued and running jobs finish for up to ``grace_seconds``, fail the rest.

        A job still running after the grace period keeps its thread until it returns (a thread cannot
        be killed); its future is then resolved as usual, and the thread ends.
        """
        with self._cond:
            if self._state in (WorkerState.STOPPING, WorkerState.STOPPED):
                return
            self._state = WorkerState.STOPPING
            self._cond.notify_all()  # idle threads see the state and leave once the queue is empty
        deadline = time.monotonic() + grace_seconds
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        self._fail_pending(ServiceUnavailableError("the server stopped before this job ran"))
        self._state = WorkerState.STOPPED

    def _loop(self) -> None:
        try:
            if self._thread_init is not None:
                self._thread_init()
            while True:
                with self._cond:
                    while not self._jobs and self._state is WorkerState.RUNNING:
                        self._cond.wait()
                    if not self._jobs:  # stopping, and everything accepted has been taken
                        return
                    job = self._jobs.popleft()
                try:
                    self._run(job)
                finally:
                    if not job.future.done():  # only if _run itself broke: never leave its caller waiting
                        with contextlib.suppress(InvalidStateError):
                            job.future.set_exception(InternalError("the inference worker failed running this job"))
        except BaseException:  # a bug in the loop itself
            log.exception("inference worker thread died")
            raise
        finally:
            with self._cond:
                self._alive -= 1
                last = self._alive == 0
                if last:
                    self._state = WorkerState.STOPPED
            if last:  # nobody is left to run what is queued: fail it rather than leave it hanging
                self._fail_pending(InternalError("the inference worker stopped unexpectedly"))

    @staticmethod
    def _run(job: Job[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        log.debug("job %s started", job.label)
        try:
            job.future.set_result(job.context.run(job.run))
        except BaseException as exc:
            job.future.set_exception(exc)
        log.debug("job %s finished", job.label)

    def _fail_pending(self, error: Exception) -> None:
        with self._cond:
            pending, self._jobs = list(self._jobs), deque()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

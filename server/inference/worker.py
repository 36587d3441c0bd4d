"""The inference worker: one thread that owns the device and drains a bounded job queue.

The API never calls the network itself. It submits a job and awaits the job's future; the worker
runs jobs one at a time (the network already uses every core or the whole GPU), so a burst of
requests queues here instead of fighting over memory. Every future is resolved exactly once, on
every path: success, failure, shutdown, or the worker thread dying.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from server.errors import InternalError, QueueFullError, ServiceUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Job(Generic[T]):
    """A unit of device work: ``run`` is called on the worker thread; ``label`` names it in logs."""

    run: Callable[[], T]
    label: str
    future: Future[T] = field(default_factory=Future)
    #: The submitter's context, so the job runs as if called where it was submitted (its taskUUID
    #: reaches the worker's log lines), as ``asyncio.to_thread`` does for its threads.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


_STOP = object()


class InferenceWorker:
    """Runs submitted jobs on a single thread, in order, with a bounded queue in front."""

    def __init__(self, *, max_queue: int, name: str = "inference-worker") -> None:
        self._queue: queue.Queue[Job[object] | object] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._state = WorkerState.STARTING
        self._lock = threading.Lock()
        self.busy = False

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._state = WorkerState.RUNNING
        self._thread.start()

    def submit(self, run: Callable[[], T], *, label: str) -> Future[T]:
        """Queue ``run``; QueueFullError at once when the queue is full (the caller answers 429)."""
        job: Job[T] = Job(run, label)
        with self._lock:
            if self._state is not WorkerState.RUNNING:
                raise ServiceUnavailableError("the server is shutting down and takes no new work")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFullError(
                    f"the upscale queue is full ({self._queue.maxsize} jobs waiting); retry shortly"
                ) from None
        return job.future

    def stop(self, grace_seconds: float) -> None:
        """Stop taking work, let queued and running jobs finish for up to ``grace_seconds``, fail the rest."""
        with self._lock:
            if self._state in (WorkerState.STOPPING, WorkerState.STOPPED):
                return
            self._state = WorkerState.STOPPING
        if self._thread.is_alive():
            self._queue.put(_STOP)  # behind every accepted job: they run first
            self._thread.join(grace_seconds)
        self._fail_pending(ServiceUnavailableError("the server stopped before this job ran"))
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)  # a job still running past the grace period ends the thread after it
        self._state = WorkerState.STOPPED

    def _loop(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                assert isinstance(item, Job)
                self._run(item)
        except BaseException:  # pragma: no cover - a bug in the loop itself
            log.exception("inference worker died")
            raise
        finally:
            self._state = WorkerState.STOPPED
            self._fail_pending(InternalError("the inference worker stopped unexpectedly"))

    def _run(self, job: Job[object]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        self.busy = True
        try:
            job.future.set_result(job.context.run(job.run))
        except BaseException as exc:
            job.future.set_exception(exc)
        finally:
            self.busy = False

    def _fail_pending(self, error: Exception) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Job) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(error)

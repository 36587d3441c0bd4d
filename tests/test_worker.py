"""The inference worker: bounded queue, N jobs at a time (1 by default), every future resolved on every path."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from upscale_server.errors import InternalError, ServiceUnavailableError
from upscale_server.inference.runtime.worker import InferenceWorker, Job, WorkerState


def blocker(started: threading.Event, release: threading.Event, value: str) -> Callable[[], str]:
    def run() -> str:
        started.set()
        assert release.wait(10), "never released"
        return value

    return run


def test_runs_jobs_in_order_and_propagates_errors() -> None:
    worker = InferenceWorker()
    worker.start()
    order: list[int] = []
    futures = [worker.submit(lambda i=i: order.append(i) or i * 10, label=f"job{i}") for i in range(5)]

    def boom() -> None:
        raise ValueError("bad input")

    failing = worker.submit(boom, label="boom")
    assert [f.result(timeout=10) for f in futures] == [0, 10, 20, 30, 40]
    assert order == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="bad input"):
        failing.result(timeout=10)
    worker.stop(5)
    assert worker.state is WorkerState.STOPPED


def test_stop_lets_accepted_work_finish_then_refuses_new_work() -> None:
    worker = InferenceWorker()
    worker.start()
    slow = worker.submit(lambda: time.sleep(0.2) or "done", label="slow")
    queued = worker.submit(lambda: "queued", label="queued")
    worker.stop(grace_seconds=10)
    assert slow.result(timeout=1) == "done"
    assert queued.result(timeout=1) == "queued"
    with pytest.raises(ServiceUnavailableError):
        worker.submit(lambda: 1, label="late")


def test_jobs_left_after_the_grace_period_fail_instead_of_hanging() -> None:
    worker = InferenceWorker()
    worker.start()
    started, release = threading.Event(), threading.Event()
    worker.submit(blocker(started, release, "stuck"), label="stuck")
    assert started.wait(10)
    pending = worker.submit(lambda: 1, label="pending")
    worker.stop(grace_seconds=0.2)
    with pytest.raises(ServiceUnavailableError):
        pending.result(timeout=1)
    release.set()


def test_concurrency_two_runs_two_jobs_at_once_and_queues_the_third() -> None:
    worker = InferenceWorker(concurrency=2)
    worker.start()
    started = [threading.Event() for _ in range(3)]
    release = threading.Event()
    futures = [worker.submit(blocker(started[i], release, f"job{i}"), label=f"job{i}") for i in range(3)]
    assert started[0].wait(10) and started[1].wait(10)  # both run together: neither can finish before release
    assert worker.queue_depth == 1 and not started[2].is_set()
    release.set()
    assert [f.result(timeout=10) for f in futures] == ["job0", "job1", "job2"]
    worker.stop(5)
    assert worker.state is WorkerState.STOPPED
    assert not any(thread.is_alive() for thread in worker._threads)


def test_concurrency_one_never_overlaps_jobs() -> None:
    worker = InferenceWorker()
    worker.start()
    started = [threading.Event() for _ in range(2)]
    release = threading.Event()
    first = worker.submit(blocker(started[0], release, "a"), label="a")
    second = worker.submit(blocker(started[1], release, "b"), label="b")
    assert started[0].wait(10)
    assert worker.queue_depth == 1 and not started[1].is_set()  # the second waits for the only thread
    release.set()
    assert (first.result(timeout=10), second.result(timeout=10)) == ("a", "b")
    worker.stop(5)


def test_stop_with_concurrency_drains_then_fails_what_is_left_after_the_grace() -> None:
    worker = InferenceWorker(concurrency=2)
    worker.start()
    started = [threading.Event() for _ in range(2)]
    release = threading.Event()
    stuck = [worker.submit(blocker(started[i], release, "late"), label=f"stuck{i}") for i in range(2)]
    assert started[0].wait(10) and started[1].wait(10)
    pending = [worker.submit(lambda: "never", label=f"p{i}") for i in range(3)]
    worker.stop(grace_seconds=0.1)
    assert worker.state is WorkerState.STOPPED
    for future in pending:
        with pytest.raises(ServiceUnavailableError):
            future.result(timeout=1)
    with pytest.raises(ServiceUnavailableError):
        worker.submit(lambda: 1, label="after")
    release.set()  # the jobs running past the grace period still resolve their futures, once
    assert [f.result(timeout=10) for f in stuck] == ["late", "late"]


def test_stop_runs_queued_jobs_on_every_thread_within_the_grace() -> None:
    worker = InferenceWorker(concurrency=3)
    worker.start()
    futures = [worker.submit(lambda i=i: i, label=f"j{i}") for i in range(10)]
    worker.stop(grace_seconds=10)
    assert [f.result(timeout=1) for f in futures] == list(range(10))


def test_cancelled_job_is_skipped() -> None:
    worker = InferenceWorker()
    worker.start()
    started, release = threading.Event(), threading.Event()
    first = worker.submit(blocker(started, release, "a"), label="a")
    assert started.wait(10)
    ran: list[str] = []
    cancelled = worker.submit(lambda: ran.append("b"), label="b")
    assert cancelled.cancel()
    release.set()
    assert first.result(timeout=10) == "a"
    worker.stop(5)
    assert ran == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("concurrency", [1, 2])
def test_dead_worker_threads_fail_their_job_and_then_the_queue(monkeypatch, concurrency: int) -> None:
    """A bug in the loop kills a thread: its job fails at once; when the last thread is gone, so does the queue."""
    worker = InferenceWorker(concurrency=concurrency)
    entered = threading.Semaphore(0)
    release = threading.Event()

    def broken_run(job: Job[object]) -> None:
        entered.release()
        release.wait(10)
        raise RuntimeError("bug in the worker loop")

    monkeypatch.setattr(worker, "_run", broken_run)
    worker.start()
    taken = [worker.submit(lambda: 1, label=f"t{i}") for i in range(concurrency)]
    for _ in range(concurrency):
        assert entered.acquire(timeout=10)
    queued = worker.submit(lambda: 2, label="queued")
    release.set()
    for future in [*taken, queued]:
        with pytest.raises(InternalError):
            future.result(timeout=10)
    assert worker.state is WorkerState.STOPPED
    with pytest.raises(ServiceUnavailableError):
        worker.submit(lambda: 3, label="after")
    for thread in worker._threads:  # the threads' deaths are reported within this test, not a later one
        thread.join(10)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        InferenceWorker(concurrency=0)

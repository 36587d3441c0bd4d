"""The inference worker: bounded queue, one job at a time, every future resolved on every path."""

from __future__ import annotations

import threading
import time

import pytest

from server.errors import QueueFullError, ServiceUnavailableError
from server.inference.worker import InferenceWorker, WorkerState


def test_runs_jobs_in_order_and_propagates_errors() -> None:
    worker = InferenceWorker(max_queue=8)
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


def test_full_queue_is_refused_at_once() -> None:
    worker = InferenceWorker(max_queue=2)
    worker.start()
    release = threading.Event()
    running = worker.submit(release.wait, label="blocker")
    while not worker.busy:
        time.sleep(0.01)
    queued = [worker.submit(lambda: 1, label="q") for _ in range(2)]
    with pytest.raises(QueueFullError) as full:
        worker.submit(lambda: 1, label="overflow")
    assert full.value.http_status == 429
    assert worker.queue_depth == 2
    release.set()
    assert running.result(timeout=10) is True
    assert [q.result(timeout=10) for q in queued] == [1, 1]
    worker.stop(5)


def test_stop_lets_accepted_work_finish_then_refuses_new_work() -> None:
    worker = InferenceWorker(max_queue=4)
    worker.start()
    slow = worker.submit(lambda: time.sleep(0.2) or "done", label="slow")
    queued = worker.submit(lambda: "queued", label="queued")
    worker.stop(grace_seconds=10)
    assert slow.result(timeout=1) == "done"
    assert queued.result(timeout=1) == "queued"
    with pytest.raises(ServiceUnavailableError):
        worker.submit(lambda: 1, label="late")


def test_jobs_left_after_the_grace_period_fail_instead_of_hanging() -> None:
    worker = InferenceWorker(max_queue=4)
    worker.start()
    release = threading.Event()
    worker.submit(release.wait, label="stuck")
    while not worker.busy:
        time.sleep(0.01)
    pending = worker.submit(lambda: 1, label="pending")
    worker.stop(grace_seconds=0.2)
    with pytest.raises(ServiceUnavailableError):
        pending.result(timeout=1)
    release.set()

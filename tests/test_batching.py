"""Dynamic batching of tiles: grouping, the window, max_batch, errors, close, and the engine hook.

Deterministic on a busy machine: the window is measured on a fake clock that moves only when a test
moves it, so a batch goes either because it is full or because the test let its window pass; no
assertion depends on how fast threads run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from tests.test_engine import CPU, Recording, TinyNet, image, network
from upscale_server.errors import InferenceError
from upscale_server.inference.engine.tiling import plan_tiles
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.runtime.batching import BatcherClosedError, BatcherTimeoutError, DynamicBatcher

#: How long a test waits for threads that should already be done: a hang guard, not a measurement.
PATIENCE_S = 30


class FakeClock:
    """A monotonic clock that stands still until :meth:`advance`, and knows who read it.

    The batcher reads it once when it queues an item (an arrival, on the caller's thread, under the
    batcher's lock) and each time it weighs its queue (a look, on its own thread, under that lock).
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.arrivals = 0
        self.looks = 0
        self._looks_before = 0  # looks before the last arrival or advance
        self._cond = threading.Condition()

    def __call__(self) -> float:
        with self._cond:
            if threading.current_thread().name == "tile-batcher":
                self.looks += 1
            else:
                self.arrivals += 1
                self._looks_before = self.looks
            self._cond.notify_all()
            return self.now

    def advance(self, seconds: float) -> None:
        with self._cond:
            self.now += seconds
            self._looks_before = self.looks

    def wait_arrivals(self, count: int) -> None:
        """Until ``count`` items have been queued in all."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.arrivals >= count, PATIENCE_S)

    def wait_seen(self, arrivals: int) -> None:
        """Until ``arrivals`` items have been queued and the batcher has weighed its queue since the
        last arrival or :meth:`advance`: it has decided with everything the test has done so far."""
        with self._cond:
            assert self._cond.wait_for(
                lambda: self.arrivals >= arrivals and self.looks > self._looks_before, PATIENCE_S
            )


class Deadline:
    """The batcher's wait for a result, with a deadline that passes when the test says so.

    Until :meth:`pass_now`, a waiting caller gets its result whenever it comes; after it, every
    caller still waiting (and every later one, until :meth:`reset`) gives up at once.
    """

    def __init__(self) -> None:
        self.passed = threading.Event()
        self.timeouts: list[float | None] = []

    def __call__(self, done: threading.Event, timeout_s: float | None) -> bool:
        self.timeouts.append(timeout_s)
        while not done.wait(0.01):  # a poll for the test's signal, not a timing
            if self.passed.is_set():
                return done.is_set()
        return True

    def pass_now(self) -> None:
        self.passed.set()

    def reset(self) -> None:
        self.passed.clear()


def _wait(done: threading.Event, timeout_s: float | None) -> bool:
    """A real wait that cannot expire in a test: a caller that hangs fails the test instead."""
    return done.wait(PATIENCE_S if timeout_s is None else min(timeout_s, PATIENCE_S))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def batcher(clock: FakeClock) -> Iterator[Callable[..., DynamicBatcher]]:
    """A factory of batchers on the test's fake clock, all closed at the end of the test."""
    made: list[DynamicBatcher] = []

    def make(window_s: float = 0.2, max_batch: int = 8, deadline: Deadline | None = None) -> DynamicBatcher:
        made.append(
            DynamicBatcher(
                window_s=window_s,
                max_batch=max_batch,
                clock=clock,
                timeout_s=PATIENCE_S if deadline is None else 7.0,
                wait=_wait if deadline is None else deadline,
            )
        )
        return made[-1]

    yield make
    for b in made:
        b.close()


class CountingForward:
    """``x * 2 + 1`` that records the batch size of every call (on the batcher thread)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(batch.shape[0])
        return batch * 2 + 1


def in_threads(count: int, work: Callable[[int], object]) -> tuple[dict[int, object], list[BaseException]]:
    """Run ``work(i)`` on ``count`` threads started together; results and errors by index."""
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=PATIENCE_S)
    assert not any(t.is_alive() for t in threads), "a caller never got its result"
    return results, errors


def started(work: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """``work()`` on a thread of its own; the list receives its result."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    return thread, out


def finished(thread: threading.Thread) -> None:
    thread.join(timeout=PATIENCE_S)
    assert not thread.is_alive(), "a caller never got its result"


def test_items_of_concurrent_callers_share_one_forward(batcher: Callable[..., DynamicBatcher]) -> None:
    b = batcher(window_s=1.0, max_batch=6)  # the clock stands still: the batch goes when it is full
    forward = CountingForward()
    items = [torch.full((1, 3, 4, 4), float(i)) for i in range(6)]
    results, errors = in_threads(6, lambda i: b.run("k", items[i], forward))
    assert not errors
    assert forward.sizes == [6]
    for i in range(6):
        torch.testing.assert_close(results[i], items[i] * 2 + 1)


def test_an_item_waits_for_its_window_then_goes_alone(batcher: Callable[..., DynamicBatcher], clock: FakeClock) -> None:
    b = batcher(window_s=0.5, max_batch=8)
    forward = CountingForward()
    thread, out = started(lambda: b.run("k", torch.ones(1, 2), forward))
    clock.wait_seen(arrivals=1)
    assert forward.sizes == []  # the batcher has seen it, and waits while its window is open
    clock.advance(0.25)
    clock.wait_seen(arrivals=1)
    assert forward.sizes == []
    clock.advance(0.25)  # the window has passed: it goes without company
    finished(thread)
    assert forward.sizes == [1]
    torch.testing.assert_close(out[0], torch.full((1, 2), 3.0))
    # An item arriving after that batch went goes into the next one, after its own window.
    late, late_out = started(lambda: b.run("k", torch.zeros(1, 2), forward))
    clock.wait_seen(arrivals=2)
    assert forward.sizes == [1]
    clock.advance(0.5)
    finished(late)
    assert forward.sizes == [1, 1]
    torch.testing.assert_close(late_out[0], torch.ones(1, 2))


def test_a_full_batch_goes_without_waiting_and_max_batch_holds(batcher: Callable[..., DynamicBatcher]) -> None:
    b = batcher(window_s=1.0, max_batch=2)  # the clock stands still: only full batches can go
    forward = CountingForward()
    results, errors = in_threads(4, lambda i: b.run("k", torch.full((1, 1), float(i)), forward))
    assert not errors
    assert forward.sizes == [2, 2]
    for i in range(4):
        torch.testing.assert_close(results[i], torch.full((1, 1), 2.0 * i + 1))


def test_different_keys_never_share_a_batch(batcher: Callable[..., DynamicBatcher], clock: FakeClock) -> None:
    b = batcher(window_s=0.3, max_batch=8)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    order: list[str] = []

    def forward_for(key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            seen[key].append(x.shape[0])
            order.append(key)
            return x + (10 if key == "a" else 20)

        return forward

    keys = ["a", "b", "a", "b", "a"]
    threads = []
    for i, key in enumerate(keys):  # queued in this order
        threads.append(started(lambda i=i, key=key: b.run(key, torch.full((1, 1), float(i)), forward_for(key))))
        clock.wait_arrivals(i + 1)
    clock.advance(1.0)  # every window has passed: everything queued goes, one batch per key
    for thread, _ in threads:
        finished(thread)
    assert seen == {"a": [3], "b": [2]}
    assert order[0] == keys[0]  # the oldest item's key is served first
    for i, (_, out) in enumerate(threads):
        torch.testing.assert_close(out[0], torch.full((1, 1), i + (10.0 if keys[i] == "a" else 20.0)))


def test_an_error_in_forward_reaches_every_caller_of_the_batch(
    batcher: Callable[..., DynamicBatcher], clock: FakeClock
) -> None:
    b = batcher(window_s=1.0, max_batch=3)
    calls: list[int] = []

    def broken(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        raise RuntimeError(f"boom on {x.shape[0]}")

    results, errors = in_threads(3, lambda i: b.run("k", torch.zeros(1, 1), broken))
    assert calls == [3]  # one batch
    assert not results and len(errors) == 3
    assert all(isinstance(e, RuntimeError) and str(e) == "boom on 3" for e in errors)
    # The batcher keeps working afterwards.
    thread, out = started(lambda: b.run("k", torch.ones(1, 1), CountingForward()))
    clock.wait_arrivals(4)
    clock.advance(1.0)
    finished(thread)
    torch.testing.assert_close(out[0], torch.full((1, 1), 3.0))


def test_a_forward_that_drops_rows_is_an_error(batcher: Callable[..., DynamicBatcher]) -> None:
    b = batcher(window_s=0.0)
    with pytest.raises(RuntimeError, match="rows"):
        b.run("k", torch.zeros(2, 1), lambda x: x[:1])


def test_close_fails_pending_items_and_later_calls(batcher: Callable[..., DynamicBatcher], clock: FakeClock) -> None:
    b = batcher(window_s=30.0, max_batch=8)
    errors: list[BaseException] = []

    def wait_forever() -> None:
        try:
            b.run("k", torch.zeros(1, 1), CountingForward())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait_forever)
    thread.start()
    clock.wait_seen(arrivals=1)  # queued, and the batcher is waiting out its window
    b.close()
    finished(thread)
    assert len(errors) == 1 and isinstance(errors[0], BatcherClosedError)
    assert "closed before this item ran" in str(errors[0])
    with pytest.raises(BatcherClosedError):
        b.run("k", torch.zeros(1, 1), CountingForward())
    b.close()  # idempotent


@pytest.mark.parametrize(("window_s", "max_batch"), [(-0.1, 4), (0.1, 0)])
def test_bad_settings_are_refused(window_s: float, max_batch: int) -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(window_s=window_s, max_batch=max_batch)


def test_items_that_cannot_be_stacked_fail_only_their_own_batch(
    batcher: Callable[..., DynamicBatcher], clock: FakeClock
) -> None:
    b = batcher(window_s=1.0, max_batch=2)
    other, other_out = started(lambda: b.run("other", torch.ones(1, 1), CountingForward()))
    clock.wait_arrivals(1)  # queued first: its key is served first, once its window passes
    errors: list[BaseException] = []

    def mismatched(width: int) -> None:
        try:
            b.run("k", torch.zeros(1, width), CountingForward())
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=mismatched, args=(w,)) for w in (2, 3)]
    for t in callers:
        t.start()
    clock.wait_arrivals(3)
    clock.advance(1.0)
    for t in [other, *callers]:
        finished(t)
    torch.testing.assert_close(other_out[0], torch.full((1, 1), 3.0))
    assert len(errors) == 2
    for error in errors:
        assert isinstance(error, RuntimeError) and "could not be stacked" in str(error)
        assert "(1, 2), (1, 3)" in str(error) or "(1, 3), (1, 2)" in str(error)


class StuckForward:
    """A forward that blocks until :attr:`release` is set; :attr:`entered` tells that it runs."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.release.wait(PATIENCE_S), "the test never released the stuck pass"
        return batch


def test_a_caller_of_a_stuck_pass_times_out_and_later_batches_still_run(
    batcher: Callable[..., DynamicBatcher], clock: FakeClock
) -> None:
    deadline = Deadline()
    b = batcher(window_s=0.0, deadline=deadline)
    stuck = StuckForward()
    queued = CountingForward()
    errors: dict[str, BaseException] = {}

    def caller(key: str, forward: Callable[[torch.Tensor], torch.Tensor]) -> threading.Thread:
        def run() -> None:
            try:
                b.run(key, torch.zeros(1, 1), forward)
            except BaseException as exc:
                errors[key] = exc

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    on_stuck = caller("stuck", stuck)
    assert stuck.entered.wait(PATIENCE_S)
    behind = caller("queued", queued)  # another key, queued behind the stuck pass
    clock.wait_arrivals(2)
    deadline.pass_now()
    finished(on_stuck)
    finished(behind)
    assert isinstance(errors["stuck"], BatcherTimeoutError) and "has not returned" in str(errors["stuck"])
    assert isinstance(errors["queued"], BatcherTimeoutError) and "still queued" in str(errors["queued"])
    assert "after 7 s" in str(errors["stuck"]) and deadline.timeouts == [7.0, 7.0]
    # The stuck pass returns at last: the worker serves the queue again; the item that gave up is gone.
    deadline.reset()
    stuck.release.set()
    later = CountingForward()
    torch.testing.assert_close(b.run("later", torch.ones(1, 1), later), torch.full((1, 1), 3.0))
    assert later.sizes == [1] and queued.sizes == []


def test_a_failing_worker_thread_closes_the_batcher() -> None:
    def broken_init() -> None:
        raise RuntimeError("no device")

    b = DynamicBatcher(window_s=0.0, max_batch=1, thread_init=broken_init)
    with pytest.raises(BatcherClosedError):  # refused, or failed by the dying worker: never left waiting
        b.run("k", torch.zeros(1, 1), CountingForward())
    b.close()


def test_a_non_positive_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        DynamicBatcher(window_s=0.0, max_batch=1, timeout_s=0)


# --------------------------------------------------------------------------- the engine hook


def test_engine_batches_windows_of_concurrent_calls(batcher: Callable[..., DynamicBatcher]) -> None:
    net = TinyNet(2, seed=4)
    plain = Upscaler(network(TinyNet(2, seed=4), 2), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=4)
    rec = Recording(net)
    # The clock stands still: a pass runs only with one window of each of the four calls.
    shared = batcher(window_s=1.0, max_batch=4)
    up = Upscaler(network(rec, 2), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=4, batcher=shared)
    images = [image(40, 40, seed=s) for s in range(4)]
    expected = [plain.upscale(rgb) for rgb in images]
    results, errors = in_threads(4, lambda i: up.upscale(images[i]))
    assert not errors
    for i in range(4):
        # oneDNN may sum a batch of four in another order than a single window: fp32 rounding, far
        # below one level of an 8-bit output (1/255)
        np.testing.assert_allclose(np.asarray(results[i]), expected[i], atol=1e-3)
    windows = len(plan_tiles(40, 40, 16, 4))
    assert windows > 1
    assert len(rec.sizes) == windows  # every forward call carried four windows, one per call


def test_engine_turns_a_closed_batcher_into_an_inference_error(batcher: Callable[..., DynamicBatcher]) -> None:
    shared = batcher()
    up = Upscaler(network(TinyNet(2), 2), device=CPU, dtype=torch.float32, batcher=shared)
    shared.close()
    with pytest.raises(InferenceError, match="shutting down"):
        up.upscale(image(8, 8))


def test_engine_turns_a_batcher_timeout_into_an_inference_error(batcher: Callable[..., DynamicBatcher]) -> None:
    deadline = Deadline()
    shared = batcher(window_s=0.0, deadline=deadline)
    stuck = StuckForward()

    def block() -> None:
        with pytest.raises(BatcherTimeoutError):  # its caller gives up too when the deadline passes
            shared.run("another network", torch.zeros(1, 1), stuck)

    blocker, _ = started(block)
    assert stuck.entered.wait(PATIENCE_S)
    up = Upscaler(network(TinyNet(2), 2), device=CPU, dtype=torch.float32, batcher=shared)
    deadline.pass_now()  # the engine's tile queues behind the stuck pass and gives up at once
    try:
        with pytest.raises(InferenceError, match="inference timed out"):
            up.upscale(image(8, 8))
    finally:
        deadline.reset()
        stuck.release.set()
    finished(blocker)

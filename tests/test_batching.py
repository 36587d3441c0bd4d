"""Dynamic batching of tiles: grouping, the window, max_batch, errors, close, and the engine hook."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from tests.test_engine import CPU, Recording, TinyNet, image, network
from upscale_server.errors import InferenceError
from upscale_server.inference.engine.tiling import plan_tiles
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.runtime.batching import BatcherClosedError, DynamicBatcher


@pytest.fixture
def batcher() -> Iterator[Callable[..., DynamicBatcher]]:
    """A factory of batchers, all closed at the end of the test."""
    made: list[DynamicBatcher] = []

    def make(window_s: float = 0.2, max_batch: int = 8) -> DynamicBatcher:
        made.append(DynamicBatcher(window_s=window_s, max_batch=max_batch))
        return made[-1]

    yield make
    for b in made:
        b.close()


class CountingForward:
    """``x * 2 + 1`` that records the batch size of every call (on the batcher thread)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay_s = delay_s

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(batch.shape[0])
        time.sleep(self.delay_s)
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
        t.join(timeout=30)
    return results, errors


def test_items_of_concurrent_callers_share_one_forward(batcher: Callable[..., DynamicBatcher]) -> None:
    b = batcher(window_s=0.5, max_batch=8)
    forward = CountingForward()
    items = [torch.full((1, 3, 4, 4), float(i)) for i in range(6)]
    results, errors = in_threads(6, lambda i: b.run("k", items[i], forward))
    assert not errors
    assert sum(forward.sizes) == 6 and len(forward.sizes) < 6
    for i in range(6):
        torch.testing.assert_close(results[i], items[i] * 2 + 1)


def test_the_first_item_waits_at_most_the_window(batcher: Callable[..., DynamicBatcher]) -> None:
    b = batcher(window_s=0.3, max_batch=8)
    forward = CountingForward()
    start = time.monotonic()
    out = b.run("k", torch.ones(1, 2), forward)
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 2.0
    assert forward.sizes == [1]
    torch.testing.assert_close(out, torch.full((1, 2), 3.0))
    # An item arriving after the window closed goes into the next batch.
    late: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: late.append(b.run("k", torch.zeros(1, 2), forward)))
    first = threading.Thread(target=lambda: b.run("k", torch.ones(1, 2), forward))
    first.start()
    time.sleep(0.5)
    thread.start()
    first.join()
    thread.join()
    assert forward.sizes == [1, 1, 1]


def test_a_full_batch_goes_without_waiting_and_max_batch_holds(batcher: Callable[..., DynamicBatcher]) -> None:
    b = batcher(window_s=5.0, max_batch=2)
    forward = CountingForward()
    start = time.monotonic()
    results, errors = in_threads(4, lambda i: b.run("k", torch.full((1, 1), float(i)), forward))
    assert not errors
    assert time.monotonic() - start < 4.0  # two full batches, never the 5 s window
    assert forward.sizes == [2, 2]
    for i in range(4):
        torch.testing.assert_close(results[i], torch.full((1, 1), 2.0 * i + 1))


def test_different_keys_never_share_a_batch(batcher: Callable[..., DynamicBatcher]) -> None:
    b = batcher(window_s=0.3, max_batch=8)
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def forward_for(key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            seen[key].append(x.shape[0])
            return x + (10 if key == "a" else 20)

        return forward

    keys = ["a", "b", "a", "b", "a"]
    results, errors = in_threads(5, lambda i: b.run(keys[i], torch.full((1, 1), float(i)), forward_for(keys[i])))
    assert not errors
    assert sum(seen["a"]) == 3 and sum(seen["b"]) == 2
    for i, key in enumerate(keys):
        torch.testing.assert_close(results[i], torch.full((1, 1), i + (10.0 if key == "a" else 20.0)))


def test_an_error_in_forward_reaches_every_caller_of_the_batch(batcher: Callable[..., DynamicBatcher]) -> None:
    b = batcher(window_s=0.3, max_batch=8)

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"boom on {x.shape[0]}")

    results, errors = in_threads(3, lambda i: b.run("k", torch.zeros(1, 1), broken))
    assert not results and len(errors) == 3
    assert all(isinstance(e, RuntimeError) and str(e).startswith("boom") for e in errors)
    # The batcher keeps working afterwards.
    torch.testing.assert_close(b.run("k", torch.ones(1, 1), CountingForward()), torch.full((1, 1), 3.0))


def test_a_forward_that_drops_rows_is_an_error(batcher: Callable[..., DynamicBatcher]) -> None:
    b = batcher(window_s=0.0)
    with pytest.raises(RuntimeError, match="rows"):
        b.run("k", torch.zeros(2, 1), lambda x: x[:1])


def test_close_fails_pending_items_and_later_calls(batcher: Callable[..., DynamicBatcher]) -> None:
    b = batcher(window_s=30.0, max_batch=8)
    errors: list[BaseException] = []

    def wait_forever() -> None:
        try:
            b.run("k", torch.zeros(1, 1), CountingForward())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait_forever)
    thread.start()
    time.sleep(0.2)
    start = time.monotonic()
    b.close()
    thread.join(timeout=5)
    assert time.monotonic() - start < 5
    assert len(errors) == 1 and isinstance(errors[0], BatcherClosedError)
    with pytest.raises(BatcherClosedError):
        b.run("k", torch.zeros(1, 1), CountingForward())
    b.close()  # idempotent


@pytest.mark.parametrize(("window_s", "max_batch"), [(-0.1, 4), (0.1, 0)])
def test_bad_settings_are_refused(window_s: float, max_batch: int) -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(window_s=window_s, max_batch=max_batch)


# --------------------------------------------------------------------------- the engine hook


def test_engine_batches_windows_of_concurrent_calls(batcher: Callable[..., DynamicBatcher]) -> None:
    net = TinyNet(2, seed=4)
    plain = Upscaler(network(TinyNet(2, seed=4), 2), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=4)
    rec = Recording(net)
    shared = batcher(window_s=0.05, max_batch=8)
    up = Upscaler(network(rec, 2), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=4, batcher=shared)
    images = [image(40, 40, seed=s) for s in range(4)]
    expected = [plain.upscale(rgb) for rgb in images]
    results, errors = in_threads(4, lambda i: up.upscale(images[i]))
    assert not errors
    for i in range(4):
        np.testing.assert_allclose(np.asarray(results[i]), expected[i], atol=1e-6)
    windows = len(plan_tiles(40, 40, 16, 4)) * 4
    assert len(rec.sizes) < windows  # some forward calls carried several windows


def test_engine_turns_a_closed_batcher_into_an_inference_error(batcher: Callable[..., DynamicBatcher]) -> None:
    shared = batcher()
    up = Upscaler(network(TinyNet(2), 2), device=CPU, dtype=torch.float32, batcher=shared)
    shared.close()
    with pytest.raises(InferenceError, match="shutting down"):
        up.upscale(image(8, 8))

"""Dynamic batching: tiles of concurrent requests share one network pass.

On a GPU a single 1 x 3 x H x W window rarely fills the device; N windows of the same shape in one
N x 3 x H x W pass cost little more than one. Requests run on their own threads, so the batcher
collects what they send for a short time and runs it together:

* Items with the same ``key`` (the engine uses network, precision and window shape) that arrive
  within ``window_s`` of the first one are concatenated on dim 0, at most ``max_batch`` at a time.
  Items with different keys never mix; the oldest item's key is served first, so no key starves.
* ``forward`` runs once per batch on the batcher's own thread; each caller gets its rows back.
* An exception raised by ``forward``, or by stacking the batch's items (``torch.cat`` of mismatched
  shapes), reaches every caller of that batch and no one else; :meth:`DynamicBatcher.close` fails
  whatever is still waiting with :class:`BatcherClosedError`, and so does the worker thread's own end
  should it ever fail.
* No caller waits longer than ``timeout_s`` (queued and running together): past it the caller gets
  :class:`BatcherTimeoutError`, and its item is taken out of the queue if it had not started. A
  ``forward`` that never returns cannot be interrupted (Python cannot stop a thread, nor a device a
  kernel): it keeps the worker thread, so the items queued behind it time out in their turn, and the
  batcher serves the queue again as soon as it returns.

Under load the window rarely matters: while one batch runs the next one fills up, and it goes as
soon as the pass ends because its first item has already waited ``window_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
#: Seconds on a monotonic clock; injectable so tests can move time themselves.
Clock = Callable[[], float]
#: Waits for a caller's result: ``(done, timeout_s)`` -> True once ``done`` is set, False when
#: ``timeout_s`` (None: no limit) passed first. Injectable so tests decide when a deadline passes.
Wait = Callable[[threading.Event, float | None], bool]


def _wait(done: threading.Event, timeout_s: float | None) -> bool:
    return done.wait(timeout_s)


#: Default of ``timeout_s``: generous, a hang guard rather than a deadline for slow passes.
DEFAULT_TIMEOUT_S = 600.0


class BatcherClosedError(RuntimeError):
    """The batcher was closed before (or while) an item waited for its result."""


class BatcherTimeoutError(RuntimeError):
    """An item waited longer than the batcher's ``timeout_s`` for its result."""


@dataclass(eq=False)
class _Request:
    key: Hashable
    item: torch.Tensor
    forward: Forward
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None
    #: Taken into a batch by the worker thread (no longer in the queue).
    started: bool = False


class DynamicBatcher:
    """Groups same-key items from many threads into one ``forward`` call on one worker thread."""

    def __init__(
        self,
        window_s: float,
        max_batch: int,
        *,
        clock: Clock = time.monotonic,
        thread_init: Callable[[], None] | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        wait: Wait = _wait,
    ) -> None:
        """``window_s``: how long the first item of a batch waits for company (0: take only what is
        already queued); ``max_batch``: the most items per ``forward`` call (1 disables batching);
        ``clock``: what the window is measured on; ``thread_init``: called first on the batcher's
        thread (``torch.cuda.set_device``: the current device is per thread); ``timeout_s``: the longest
        a caller waits for its result, in real seconds (None: no limit); ``wait``: how a caller waits
        for its result within ``timeout_s``."""
        self._thread_init = thread_init
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._wait = wait
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.window_s = window_s
        self.max_batch = max_batch
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tile-batcher", daemon=True)
        self._thread.start()

    def run(self, key: Hashable, item: torch.Tensor, forward: Forward) -> torch.Tensor:
        """``forward(item)``, possibly as part of a larger batch; blocks until the result is ready.

        ``forward`` must map N items to N results along dim 0 (the callers of one batch must pass
        equivalent ``forward`` functions: the first one's is used). Raises what ``forward`` raised,
        :class:`BatcherClosedError` once the batcher is closed, or :class:`BatcherTimeoutError` after
        ``timeout_s``.
        """
        if item.dim() < 1 or item.shape[0] < 1:
            raise ValueError(f"an item needs a non-empty dim 0, got shape {tuple(item.shape)}")
        with self._cond:
            if self._closed:
                raise BatcherClosedError("the batcher is closed")
            request = _Request(key, item, forward, self._clock())
            self._queue.append(request)
            self._cond.notify_all()
        if not self._wait(request.done, self.timeout_s):
            with self._cond:
                if not request.done.is_set():
                    if request.started:
                        where = "its batch's network pass has not returned"
                    else:
                        where = "it was still queued behind another pass"
                        self._queue = [r for r in self._queue if r is not request]
                    raise BatcherTimeoutError(f"no result after {self.timeout_s:g} s: {where}")
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def close(self) -> None:
        """Stop the worker thread and fail every waiting item; the batch already running finishes."""
        with self._cond:
            self._closed = True
            pending, self._queue = self._queue, []
            self._cond.notify_all()
        for request in pending:
            request.error = BatcherClosedError("the batcher was closed before this item ran")
            request.done.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------------ worker thread

    def _loop(self) -> None:
        try:
            if self._thread_init is not None:
                self._thread_init()
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._execute(batch)
        except BaseException as exc:  # the worker is gone: no one may wait for it
            log.exception("the batcher's worker thread failed; the batcher is closed")
            with self._cond:
                self._closed = True
                pending, self._queue = self._queue, []
            for request in pending:
                request.error = BatcherClosedError(f"the batcher's worker stopped: {exc!r}")
                request.done.set()

    def _next_batch(self) -> list[_Request] | None:
        """Wait for the oldest item's window to pass (or its batch to fill); None once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                first = self._queue[0]
                same = [r for r in self._queue if r.key == first.key][: self.max_batch]
                remaining = first.arrived + self.window_s - self._clock()
                if len(same) >= self.max_batch or remaining <= 0:
                    taken = set(map(id, same))
                    self._queue = [r for r in self._queue if id(r) not in taken]
                    for request in same:
                        request.started = True
                    return same
                self._cond.wait(remaining)

    @staticmethod
    def _execute(batch: list[_Request]) -> None:
        sizes = [r.item.shape[0] for r in batch]
        try:
            stacked = batch[0].item if len(batch) == 1 else _stack(batch)
            out = batch[0].forward(stacked)
            if out.shape[0] != stacked.shape[0]:
                raise RuntimeError(f"forward returned {out.shape[0]} rows for {stacked.shape[0]} items")
            start = 0
            for request, size in zip(batch, sizes, strict=True):
                request.result = out if len(batch) == 1 else out[start : start + size]
                start += size
        except BaseException as exc:  # every caller of the batch must hear about it, whatever it is
            for request in batch:
                request.error = exc
        finally:
            for request in batch:
                request.done.set()


def _stack(batch: list[_Request]) -> torch.Tensor:
    """The batch's items concatenated on dim 0; a clear error when they cannot be."""
    try:
        return torch.cat([r.item for r in batch])
    except Exception as exc:
        shapes = ", ".join(str(tuple(r.item.shape)) for r in batch)
        dtypes = sorted({str(r.item.dtype) for r in batch})
        devices = sorted({str(r.item.device) for r in batch})
        raise RuntimeError(
            f"the {len(batch)} items of one batch (key {batch[0].key!r}) could not be stacked: shapes {shapes}, "
            f"dtypes {dtypes}, devices {devices}"
        ) from exc

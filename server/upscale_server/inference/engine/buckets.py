"""Window shapes for the device pipeline: a small fixed set of square sides (buckets).

Pure functions on sizes, no torch. Why buckets:

* **Batches form across requests.** The batcher only stacks windows of one shape. With per-image
  window shapes two concurrent requests almost never match; with every window padded up to one of a
  few sides they do.
* **Warm caches.** cudnn's benchmark cache and ``torch.compile`` work per shape; a fixed set can be
  run once at start-up (:meth:`~upscale_server.inference.engine.upscaler.Upscaler.warm_up`) instead
  of on the serving thread at a request's first window.
* **Memory covers the whole batch.** A bucket is usable only when ``max_batch`` windows of it fit
  the memory budget together, and only when a batch of them keeps every activation under 2**31
  elements (32-bit indexing in the kernels).

A window smaller than its bucket (an image side shorter than the bucket) is zero-padded at its
bottom/right and run with every convolution's input masked to the real pixels
(:func:`~upscale_server.inference.engine.device_ops.masked_call`), then its output cropped: plain
padding of any mode moves the border by tens of levels (docs/architecture.md). Windows of tiled
axes are exactly the bucket side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

#: Square window sides (input pixels, context included) the device pipeline runs.
BUCKET_SIDES: Final = (128, 192, 256, 384, 512, 768, 1024)
#: Elements one tensor may hold: kernels index with signed 32-bit integers.
MAX_ACTIVATION_ELEMENTS: Final = 2**31 - 1
#: Smallest tile (owned input pixels per side) a tiling bucket must leave beside its context.
MIN_BUCKET_TILE: Final = 32


def window_cap(largest_activation_per_pixel: int, max_batch: int) -> int:
    """The largest window side (multiple of 8) whose batch of ``max_batch`` keeps the largest
    activation (``largest_activation_per_pixel`` values per input pixel) under 2**31 elements."""
    if largest_activation_per_pixel < 1 or max_batch < 1:
        raise ValueError("largest_activation_per_pixel and max_batch must be >= 1")
    side = math.isqrt(MAX_ACTIVATION_ELEMENTS // (largest_activation_per_pixel * max_batch))
    while max_batch * largest_activation_per_pixel * side * side > MAX_ACTIVATION_ELEMENTS:
        side -= 1
    return side // 8 * 8


def usable_buckets(cap: int, sides: Sequence[int] = BUCKET_SIDES) -> tuple[int, ...]:
    """The bucket sides not above ``cap``, smallest first (the cap itself when every side is above it)."""
    found = tuple(sorted(s for s in sides if s <= cap))
    return found or (cap,)


def batch_fits(side: int, bytes_per_pixel: int, max_batch: int, budget: float) -> bool:
    """Whether ``max_batch`` windows of ``side`` x ``side`` fit ``budget`` bytes together."""
    return max_batch * side * side * bytes_per_pixel <= budget


def bucket_tile(side: int, overlap: int, multiple: int = 1) -> int:
    """The tile (owned pixels) whose windows are at most ``side``: ``side`` minus the context on both
    sides, on the ``multiple`` grid the planner uses (:func:`~.tiling.plan_axis`)."""
    context = -(-overlap // multiple) * multiple
    return (side - 2 * context) // multiple * multiple


def _windows(length: int, side: int, tile: int) -> int:
    return 1 if length <= side else -(-(length - (side - tile)) // tile)


def choose_bucket(
    height: int,
    width: int,
    *,
    overlap: int,
    buckets: Sequence[int],
    bytes_per_pixel: int,
    max_batch: int,
    budget: float,
    multiple: int = 1,
) -> int:
    """The bucket side for a ``height`` x ``width`` image: the smallest one that holds it whole when
    a batch of those fits ``budget``; else the tiling bucket that fits and runs the fewest window
    pixels (ties: the larger). Falls back to the smallest tiling bucket (the out-of-memory back-off
    then decides) when none fits."""
    fitting = [s for s in buckets if batch_fits(s, bytes_per_pixel, max_batch, budget)]
    whole = [s for s in fitting if s >= max(height, width)]
    if whole:
        return min(whole)
    tiling = tiling_buckets(buckets, overlap, multiple)
    if not tiling:
        raise ValueError(f"no bucket of {tuple(buckets)} leaves a {MIN_BUCKET_TILE}px tile beside {overlap}px context")
    candidates = [s for s in tiling if s in fitting] or [tiling[0]]

    def cost(side: int) -> tuple[int, int]:
        tile = bucket_tile(side, overlap, multiple)
        return _windows(height, side, tile) * _windows(width, side, tile) * side * side, -side

    return min(candidates, key=cost)


def tiling_buckets(buckets: Sequence[int], overlap: int, multiple: int = 1) -> tuple[int, ...]:
    """The buckets that leave at least :data:`MIN_BUCKET_TILE` owned pixels beside the context."""
    return tuple(sorted(s for s in buckets if bucket_tile(s, overlap, multiple) >= MIN_BUCKET_TILE))


def smaller_bucket(side: int, buckets: Sequence[int], overlap: int, multiple: int = 1) -> int | None:
    """The next tiling bucket below ``side`` (the out-of-memory back-off), or None at the bottom."""
    below = [s for s in tiling_buckets(buckets, overlap, multiple) if s < side]
    return max(below) if below else None


def fp32_split_side(side: int, overlap: int, multiple: int = 1) -> int | None:
    """The sub-window side for redoing a reduced-precision window of ``side`` in fp32 (twice the bytes
    per pixel) in half the pixels or less, with full context; None when the window is too small to
    split (its fp32 run is small in absolute terms, so it runs whole)."""
    sub = math.isqrt(side * side // 2) // max(8, multiple) * max(8, multiple)
    if bucket_tile(sub, overlap, multiple) < MIN_BUCKET_TILE // 2 or sub >= side:
        return None
    return sub

"""Tile planning and seam blending: pure functions on sizes and numpy arrays, no torch.

A network whose memory grows with the input is run on overlapping windows of the image and the
outputs are stitched back. Two facts drive the design:

* **Context, not overlap, is what makes a tile right.** A convolutional network's output near a
  window edge differs from the untiled output because it sees zero padding instead of the real
  neighbours. Every output pixel is therefore taken from a window that holds at least
  ``overlap`` real pixels of context around it (or the image border, where untiled inference sees
  the same zero padding, so border pixels match the untiled result exactly and no padding of our
  own is needed).
* **Equal shapes batch and cache well.** Windows never shrink at the image edge: they are shifted
  inward instead, so every window of an image has the same shape (``tile + 2 * overlap`` per side,
  or the whole side when the image is smaller), which keeps cudnn's algorithm cache warm and lets
  tiles be batched later.

The image is split into *owned* regions that partition it (each ``<= tile`` per side, edge ones
up to ``tile + overlap`` since they need context on one side only). Each window is its owned
region plus context. Outputs are blended with linear-ramp (feathered) weights in a band of
half-width ``feather`` around each seam between owned regions, and the weights of all tiles sum to
exactly 1 at every output pixel (a partition of unity), so blending is a weighted sum with no
normalisation pass. ``feather=0`` is Real-ESRGAN's crop-and-paste; a feather band trades context
for smoothness: a pixel inside the band gets some weight from a window where it has only
``overlap - feather`` context.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Span:
    """One tile's extent along one axis, in input pixels; half-open intervals.

    ``own_start:own_end`` is the part of the axis this tile is responsible for (the owned regions of
    an axis partition it); ``win_start:win_end`` is the input window that is run through the
    network, which contains the owned part plus up to ``overlap`` context pixels each side.
    """

    own_start: int
    own_end: int
    win_start: int
    win_end: int

    @property
    def win_size(self) -> int:
        return self.win_end - self.win_start


@dataclass(frozen=True)
class Tile:
    """One tile of a plan: its index (row-major), and its row and column spans."""

    index: int
    rows: Span
    cols: Span

    @property
    def window(self) -> tuple[slice, slice]:
        """Slices of the input image (``image[tile.window]``) that this tile runs on."""
        return slice(self.rows.win_start, self.rows.win_end), slice(self.cols.win_start, self.cols.win_end)


@dataclass(frozen=True)
class TilePlan:
    """All tiles of an image, in row-major order, and the parameters they were planned with."""

    height: int
    width: int
    tile: int
    overlap: int
    tiles: tuple[Tile, ...]
    row_spans: tuple[Span, ...]
    col_spans: tuple[Span, ...]

    def __len__(self) -> int:
        return len(self.tiles)


def plan_axis(length: int, tile: int, overlap: int, multiple: int = 1) -> tuple[Span, ...]:
    """Split an axis of ``length`` input pixels into spans; see the module docstring for the rules.

    ``tile`` is the most pixels a tile owns (its core), ``overlap`` the context wanted on each side
    of it. A length up to ``tile + 2 * overlap`` is one span (the window would hold the whole axis
    anyway). With ``multiple > 1`` (networks that pixel-unshuffle their input) every window start and
    size is a multiple of it, so each window sees the same unshuffle grid as the whole image;
    ``length`` must then be a multiple too.
    """
    if length < 1:
        raise ValueError(f"axis length must be >= 1, got {length}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if multiple < 1 or length % multiple:
        raise ValueError(f"length {length} is not a multiple of {multiple}")
    if multiple > 1:
        # Plan on the coarse grid, then scale back: starts and sizes stay multiples of `multiple`.
        coarse = plan_axis(length // multiple, max(1, tile // multiple), -(-overlap // multiple))
        return tuple(
            Span(s.own_start * multiple, s.own_end * multiple, s.win_start * multiple, s.win_end * multiple)
            for s in coarse
        )
    window = tile + 2 * overlap
    if length <= window:
        return (Span(0, length, 0, length),)
    # Edge tiles need context on one side only, so they may own tile + overlap; the n inner parts
    # of (length - 2 * overlap) are each at most `tile` long after rounding.
    count = -(-(length - 2 * overlap) // tile)
    inner = length - 2 * overlap
    bounds = [0] + [overlap + round(k * inner / count) for k in range(1, count)] + [length]
    spans = []
    for own_start, own_end in itertools.pairwise(bounds):
        # Centre the owned part in the window, then shift the window inward at the image edges.
        start = own_start - (window - (own_end - own_start)) // 2
        start = min(max(start, 0), length - window)
        spans.append(Span(own_start, own_end, start, start + window))
    return tuple(spans)


def plan_tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> TilePlan:
    """Plan the tiles of a ``height`` x ``width`` image: the grid of :func:`plan_axis` on each axis.

    An image with both sides ``<= tile + 2 * overlap`` is a single tile covering it (not tiled).
    """
    rows = plan_axis(height, tile, overlap, multiple)
    cols = plan_axis(width, tile, overlap, multiple)
    tiles = tuple(Tile(index=i * len(cols) + j, rows=r, cols=c) for i, r in enumerate(rows) for j, c in enumerate(cols))
    return TilePlan(height, width, tile, overlap, tiles, rows, cols)


def max_feather(plan: TilePlan) -> int:
    """The widest feather half-width (input pixels) valid for ``plan``.

    A seam band must lie inside both neighbouring windows (``<= overlap``) and bands must not meet
    (``2 * feather <=`` the shortest owned part), or the weights would stop summing to 1.
    """
    owned = [s.own_end - s.own_start for s in (*plan.row_spans, *plan.col_spans)]
    return max(0, min(plan.overlap, min(owned) // 2))


def axis_weights(span: Span, length: int, scale: int, feather: int) -> FloatArray:
    """Blend weights of one span over its output window (``span.win_size * scale`` values).

    Weight 1 inside the owned part, 0 outside it beyond the seam band, and a linear ramp over the
    ``2 * feather * scale`` output pixels centred on each seam (measured at pixel centres, so the
    ramps of two neighbours add up to exactly 1). Image borders get no ramp: nothing else covers them.
    """
    n = span.win_size * scale
    centres = (np.arange(n, dtype=np.float64) + 0.5) + span.win_start * scale
    lo, hi = span.own_start * scale, span.own_end * scale
    if feather <= 0:
        weights = ((centres >= lo) & (centres < hi)).astype(np.float64)
    else:
        band = 2.0 * feather * scale
        left = np.ones(n) if span.own_start == 0 else np.clip((centres - (lo - band / 2)) / band, 0.0, 1.0)
        right = np.ones(n) if span.own_end == length else np.clip(((hi + band / 2) - centres) / band, 0.0, 1.0)
        weights = left * right
    return weights.astype(np.float32)


def tile_weights(plan: TilePlan, tile: Tile, scale: int, feather: int) -> tuple[FloatArray, FloatArray]:
    """Row and column weights of ``tile`` (the 2-D weight is their outer product)."""
    if feather > max_feather(plan):
        raise ValueError(f"feather {feather} too wide for this plan (max {max_feather(plan)})")
    return (
        axis_weights(tile.rows, plan.height, scale, feather),
        axis_weights(tile.cols, plan.width, scale, feather),
    )


def trim_tile(plan: TilePlan, tile: Tile, feather: int, margin: int) -> Tile:
    """``tile`` with its window cut down to what blending reads, plus ``margin`` pixels each side.

    Blend weights are zero beyond ``feather`` pixels of the owned part, so the rest of the context only
    served the network. A resampling filter applied to the window output needs its support
    (``margin``) beyond the weighted part; resampling just this trimmed window is less work and gives
    the weighted pixels exactly the values a resample of the whole window would. Image borders stay
    where they are (the window edge is the image edge there).
    """

    def trim(span: Span, length: int) -> Span:
        start = span.win_start if span.own_start == 0 else max(span.win_start, span.own_start - feather - margin)
        end = span.win_end if span.own_end == length else min(span.win_end, span.own_end + feather + margin)
        return Span(span.own_start, span.own_end, start, end)

    return Tile(index=tile.index, rows=trim(tile.rows, plan.height), cols=trim(tile.cols, plan.width))


#: Values (floats) per temporary in :func:`blend_into`: the weighted rows are added a few at a time.
_BLEND_CHUNK = 1 << 20


def blend_into(
    out: FloatArray, tile_out: FloatArray, tile: Tile, weights: tuple[FloatArray, FloatArray], scale: int
) -> None:
    """Add ``tile_out`` (window output, H x W x C) times its weights into ``out`` (whole output).

    Because the weights of a plan sum to 1 everywhere, ``out`` starts as zeros and is complete once
    every tile has been added; no weight accumulator or division is needed. The weighted rows are
    added in chunks of about :data:`_BLEND_CHUNK` values, so the temporaries stay a few MB however
    large the tile (each element is computed exactly as in one pass).
    """
    row_w, col_w = weights
    rows = slice(tile.rows.win_start * scale, tile.rows.win_end * scale)
    cols = slice(tile.cols.win_start * scale, tile.cols.win_end * scale)
    if tile_out.shape[:2] != (row_w.size, col_w.size):
        raise ValueError(f"tile output {tile_out.shape[:2]} does not match its window {(row_w.size, col_w.size)}")
    # Only the rows/columns with non-zero weight are touched: most of the context is weight 0.
    r = np.flatnonzero(row_w)
    c = np.flatnonzero(col_w)
    if r.size == 0 or c.size == 0:
        return
    r0, r1, c0, c1 = int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
    target = out[rows, cols]
    col_part = col_w[None, c0:c1, None]
    step = max(1, _BLEND_CHUNK // ((c1 - c0) * tile_out.shape[2]))
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        weight = row_w[a:b, None, None] * col_part
        target[a:b, c0:c1] += tile_out[a:b, c0:c1] * weight

"""Tile planner and blend weights: pure functions, checked on awkward sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from upscale_server.inference.engine.tiling import (
    Span,
    axis_weights,
    blend_into,
    max_feather,
    plan_axis,
    plan_tiles,
    tile_weights,
)

# (length, tile, overlap): odd sizes, 1-px images and edges, smaller than a tile, exact multiples.
AXIS_CASES = [
    (1, 48, 16),
    (2, 48, 16),
    (47, 48, 16),
    (48, 48, 16),
    (80, 48, 16),  # exactly tile + 2 * overlap: one window
    (81, 48, 16),  # one pixel more: two tiles
    (96, 48, 16),
    (97, 48, 16),
    (100, 48, 16),
    (144, 48, 0),  # exact multiple without overlap
    (145, 48, 0),  # 1-px last tile without overlap
    (1000, 48, 16),
    (1001, 64, 10),
    (333, 32, 8),
    (75, 32, 16),
    (5, 1, 0),
    (7, 1, 2),
]


def _check_axis(length: int, tile: int, overlap: int, spans: tuple[Span, ...]) -> None:
    # Owned parts partition the axis, in order.
    assert spans[0].own_start == 0
    assert spans[-1].own_end == length
    for a, b in itertools.pairwise(spans):
        assert a.own_end == b.own_start
    for s in spans:
        assert s.own_start < s.own_end
        # Windows lie inside the image and all have the same size (shifted inward, never shrunk).
        assert s.win_start >= 0 and s.win_end <= length
        assert s.win_size == min(length, tile + 2 * overlap)
        # Each window holds its owned part plus `overlap` real context each side (or the border).
        assert s.win_start <= max(0, s.own_start - overlap)
        assert s.win_end >= min(length, s.own_end + overlap)
    if len(spans) > 1:
        # Inner tiles own at most `tile`; edge tiles may own tile + overlap (context on one side only).
        for s in spans[1:-1]:
            assert s.own_end - s.own_start <= tile
        assert spans[0].own_end <= tile + overlap
        assert length - spans[-1].own_start <= tile + overlap


@pytest.mark.parametrize(("length", "tile", "overlap"), AXIS_CASES)
def test_axis_plan_invariants(length: int, tile: int, overlap: int) -> None:
    _check_axis(length, tile, overlap, plan_axis(length, tile, overlap))


def test_axis_plan_exhaustive_small() -> None:
    for length in range(1, 130):
        for tile in (1, 2, 7, 16, 33):
            for overlap in (0, 1, 3, 8):
                _check_axis(length, tile, overlap, plan_axis(length, tile, overlap))


def test_image_that_fits_is_one_tile() -> None:
    plan = plan_tiles(40, 70, tile=48, overlap=16)
    assert len(plan) == 1
    assert plan.tiles[0].window == (slice(0, 40), slice(0, 70))


def test_tile_count_and_equal_window_shapes() -> None:
    plan = plan_tiles(75, 100, tile=48, overlap=16)
    # Rows: 75 <= 80 -> 1; columns: ceil((100 - 32) / 48) = 2.
    assert len(plan) == 2
    assert {(t.rows.win_size, t.cols.win_size) for t in plan.tiles} == {(75, 80)}
    big = plan_tiles(1000, 513, tile=128, overlap=16)
    assert {(t.rows.win_size, t.cols.win_size) for t in big.tiles} == {(160, 160)}
    assert [t.index for t in big.tiles] == list(range(len(big)))


def test_exact_multiple_without_overlap_is_a_plain_grid() -> None:
    spans = plan_axis(144, 48, 0)
    assert [(s.own_start, s.own_end, s.win_start, s.win_end) for s in spans] == [
        (0, 48, 0, 48),
        (48, 96, 48, 96),
        (96, 144, 96, 144),
    ]


def test_multiple_keeps_windows_on_the_grid() -> None:
    for length in (4, 8, 100, 236, 1000):
        spans = plan_axis(length, 48, 10, multiple=4)
        _check_axis(length, 48, 12, spans)  # overlap rounds up to a multiple: 12 px of context
        for s in spans:
            assert s.win_start % 4 == 0 and s.win_end % 4 == 0 and s.own_start % 4 == 0
    with pytest.raises(ValueError, match="multiple"):
        plan_axis(10, 48, 10, multiple=4)


@pytest.mark.parametrize("bad", [(0, 8, 0), (8, 0, 0), (8, 8, -1)])
def test_axis_plan_rejects_bad_arguments(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        plan_axis(*bad)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 200), (97, 1), (75, 100), (130, 131), (96, 96)])
@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("feather", [0, 1, 4, 8])
def test_blend_weights_sum_to_one_everywhere(height: int, width: int, scale: int, feather: int) -> None:
    plan = plan_tiles(height, width, tile=24, overlap=8)
    feather = min(feather, max_feather(plan))
    total = np.zeros((height * scale, width * scale), dtype=np.float64)
    for tile in plan.tiles:
        rows, cols = tile_weights(plan, tile, scale, feather)
        assert rows.min() >= 0 and rows.max() <= 1 and cols.min() >= 0 and cols.max() <= 1
        r = slice(tile.rows.win_start * scale, tile.rows.win_end * scale)
        c = slice(tile.cols.win_start * scale, tile.cols.win_end * scale)
        total[r, c] += np.outer(rows, cols)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_feather_ramp_is_linear_and_centred_on_the_seam() -> None:
    spans = plan_axis(100, 30, 10)
    left, right = spans[0], spans[1]
    seam = left.own_end
    wl = axis_weights(left, 100, 1, 4)
    wr = axis_weights(right, 100, 1, 4)
    xs = np.arange(seam - 4, seam + 4)
    ramp_l = wl[xs - left.win_start]
    ramp_r = wr[xs - right.win_start]
    np.testing.assert_allclose(ramp_l, (np.arange(8)[::-1] + 0.5) / 8, atol=1e-6)
    np.testing.assert_allclose(ramp_l + ramp_r, 1.0, atol=1e-6)
    # Full weight inside the owned part away from the seam, none beyond the band.
    assert wl[0] == 1.0 and wl[seam + 4 - left.win_start :].max(initial=0.0) == 0.0


def test_feather_too_wide_is_refused() -> None:
    plan = plan_tiles(100, 100, tile=30, overlap=10)
    with pytest.raises(ValueError, match="feather"):
        tile_weights(plan, plan.tiles[0], 1, max_feather(plan) + 1)


def test_blend_reassembles_an_image_from_its_windows() -> None:
    """Blending the exact windows of an image (an identity 'network') gives the image back."""
    rng = np.random.default_rng(0)
    image = rng.random((61, 99, 3), dtype=np.float32)
    plan = plan_tiles(61, 99, tile=20, overlap=6)
    out = np.zeros_like(image)
    for tile in plan.tiles:
        blend_into(out, image[tile.window], tile, tile_weights(plan, tile, 1, 3), 1)
    np.testing.assert_allclose(out, image, atol=1e-6)


def test_blend_rejects_a_mis_sized_tile() -> None:
    plan = plan_tiles(50, 50, tile=20, overlap=4)
    tile = plan.tiles[0]
    with pytest.raises(ValueError, match="does not match"):
        blend_into(
            np.zeros((100, 100, 3), np.float32),
            np.zeros((5, 5, 3), np.float32),
            tile,
            tile_weights(plan, tile, 2, 0),
            2,
        )

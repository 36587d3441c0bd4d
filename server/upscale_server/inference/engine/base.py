"""What every engine offers: the one upscaler protocol, its image type and its input contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatImage = npt.NDArray[np.float32]
#: ``progress(done_tiles, total_tiles)``, called after each tile; an exception raised by it aborts the call.
Progress = Callable[[int, int], None]


class ImageUpscaler(Protocol):
    """What the pipeline needs from an engine: :class:`Upscaler` (a network) or :class:`ResizeUpscaler`."""

    @property
    def scale(self) -> int: ...

    def tile_size_for(self, height: int, width: int) -> int: ...

    def upscale(self, rgb: np.ndarray, *, progress: Progress | None = None) -> FloatImage: ...


def validate_rgb(rgb: object) -> FloatImage:
    """Check the engine's input contract; ValueError (a caller's bug, not a user error) if broken."""
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.float32:
        raise ValueError(f"expected float32 pixels, got {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB array, got shape {rgb.shape}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"expected a non-empty image, got shape {rgb.shape}")
    lo, hi = float(rgb.min()), float(rgb.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also false for NaN
        raise ValueError(f"expected values in [0, 1], got min {lo} max {hi}")
    return rgb

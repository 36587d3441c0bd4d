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
    """An engine: :class:`~upscale_server.inference.engine.upscaler.Upscaler` (a network) or
    :class:`~upscale_server.inference.engine.resize.ResizeUpscaler` (test-target mode).

    Contract of :meth:`upscale`: input float32 numpy H x W x 3, RGB, values in [0, 1] (anything else
    is a caller's bug: ValueError, see :func:`validate_rgb`); output float32 numpy, C-contiguous,
    values in [0, 1], at ``out_size`` (width, height), by default ``scale`` times the input.
    ``progress(done, total)`` is called after each tile; an exception it raises aborts the call.
    ``quantize_8bit`` says the caller stores the result in 8 bits: an engine may then return the
    exact floats ``k / 255`` that the encoders would round the result to.
    """

    @property
    def scale(self) -> int:
        """The native scale: the output size when no ``out_size`` is asked for."""
        ...

    def tile_size_for(self, height: int, width: int) -> int:
        """The tile edge (input pixels, without context) a ``height`` x ``width`` input is cut into."""
        ...

    def upscale(
        self,
        rgb: np.ndarray,
        *,
        progress: Progress | None = None,
        out_size: tuple[int, int] | None = None,
        quantize_8bit: bool = False,
    ) -> FloatImage: ...


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

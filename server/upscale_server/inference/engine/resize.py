"""The test-target engine: a plain Lanczos resize behind the one upscaler protocol (``engine/base.py``).

Pipelines that test their Runware integration need a server that answers exactly like the real one
(same sizes, formats, alpha handling, errors) but in milliseconds, deterministically, and without
weights on disk. Everything around the network (factor rules, the output cap, alpha, gray, 16-bit,
encoding, storage, the protocol) stays the real code; only the network is swapped for this resize.
:class:`~upscale_server.inference.registry.ModelRegistry` hands it out when ``UPSCALE_ENGINE=resize``.

The resize is :func:`upscale_server.imaging.resize_pixels` (Lanczos per channel in float), the same
function the real engine uses to go from the x4 network's output to factors 2 and 3, so it adds no
new code path whose results could drift.
"""

from __future__ import annotations

import os
import time

import numpy as np

from upscale_server.imaging import resize_pixels
from upscale_server.inference.engine.base import FloatImage, Progress, validate_rgb

#: The exit code of a process the resize engine ends on purpose (``UPSCALE_RESIZE_CRASH_WIDTH``).
CRASH_EXIT_CODE = 70


class ResizeUpscaler:
    """Upscales by ``scale`` with a Lanczos resize: the engine contract without a network.

    Contract: :class:`~upscale_server.inference.engine.base.ImageUpscaler`, as the real engine's
    (:class:`~upscale_server.inference.engine.upscaler.Upscaler`). Broken inputs raise ValueError
    through the engine's own validator, so a caller bug surfaces the same way in both modes.
    Deterministic: the same input gives the same bytes on every call and every machine with the same
    Pillow. Stateless, hence thread-safe.
    """

    def __init__(self, scale: int, *, delay_seconds: float = 0.0, crash_width: int = 0) -> None:
        """``delay_seconds``: how long each call takes at least (``UPSCALE_RESIZE_DELAY_SECONDS``);
        ``crash_width``: an input this wide ends the process at once (``UPSCALE_RESIZE_CRASH_WIDTH``)."""
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        if delay_seconds < 0:
            raise ValueError(f"delay_seconds must be >= 0, got {delay_seconds}")
        self.scale: int = scale
        self.delay_seconds = delay_seconds
        self.crash_width = crash_width

    def tile_size_for(self, height: int, width: int) -> int:
        """Never tiles: a resize needs no memory beyond its output, so the whole image is one tile."""
        return max(height, width)

    def upscale(
        self,
        rgb: np.ndarray,
        *,
        progress: Progress | None = None,
        out_size: tuple[int, int] | None = None,
        quantize_8bit: bool = False,
    ) -> FloatImage:
        """Resize ``rgb`` to exactly ``scale`` times its size, then to ``out_size`` when another size is
        asked for (as the real engine's output would be resized); ``progress(1, 1)`` once, like an
        untiled run. Never quantised: ``quantize_8bit`` only allows it.

        An exception raised by ``progress`` propagates unchanged, as with the real engine.
        """
        image = validate_rgb(rgb)
        height, width = image.shape[:2]
        native = (width * self.scale, height * self.scale)
        out_w, out_h = native if out_size is None else out_size
        if out_w < 1 or out_h < 1:
            raise ValueError(f"out_size must be positive, got {out_w}x{out_h}")
        if self.crash_width and width == self.crash_width:
            # Stands in for an input that kills its worker (a decoder fault, a driver reset): no cleanup.
            os._exit(CRASH_EXIT_CODE)
        if self.delay_seconds:
            time.sleep(self.delay_seconds)  # stands in for a network's run time: the worker thread is busy
        out = resize_pixels(image, *native)
        np.clip(out, 0.0, 1.0, out=out)
        if progress is not None:
            progress(1, 1)
        if (out_w, out_h) != native:
            out = resize_pixels(out, out_w, out_h)
        return np.ascontiguousarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"ResizeUpscaler(scale={self.scale})"

"""The test-target engine: a plain Lanczos resize behind the engine's ``Upscaler`` contract.

Pipelines that test their Runware integration need a server that answers exactly like the real one
(same sizes, formats, alpha handling, errors) but in milliseconds, deterministically, and without
weights on disk. Everything around the network (factor rules, the output cap, alpha, gray, 16-bit,
encoding, storage, the protocol) stays the real code; only the network is swapped for this resize.
:class:`~upscale_server.inference.registry.ModelRegistry` hands it out when ``UPSCALE_ENGINE=resize``.

The resize is :func:`upscale_server.imaging.resize_pixels` (Lanczos per channel in float), the same function
the pipeline already uses to go from the x4 network to factors 2 and 3, so it adds no new code path
whose results could drift.
"""

from __future__ import annotations

import time

import numpy as np

from upscale_server.imaging import resize_pixels
from upscale_server.inference.engine.base import FloatImage, Progress, validate_rgb


class ResizeUpscaler:
    """Upscales by ``scale`` with a Lanczos resize: the engine contract without a network.

    Contract (identical to :class:`~upscale_server.inference.engine.Upscaler`): input float32 numpy
    H x W x 3, RGB, values in [0, 1]; output float32 numpy (H*scale) x (W*scale) x 3 in [0, 1],
    C-contiguous. Broken inputs raise ValueError through the engine's own validator, so a caller bug
    surfaces the same way in both modes. Deterministic: the same input gives the same bytes on every
    call and every machine with the same Pillow. Stateless, hence thread-safe.
    """

    def __init__(self, scale: int, *, delay_seconds: float = 0.0) -> None:
        """``delay_seconds``: how long each call takes at least (``UPSCALE_RESIZE_DELAY_SECONDS``)."""
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        if delay_seconds < 0:
            raise ValueError(f"delay_seconds must be >= 0, got {delay_seconds}")
        self.scale: int = scale
        self.delay_seconds = delay_seconds

    def tile_size_for(self, height: int, width: int) -> int:
        """Never tiles: a resize needs no memory beyond its output, so the whole image is one tile."""
        return max(height, width)

    def upscale(self, rgb: np.ndarray, *, progress: Progress | None = None) -> FloatImage:
        """Resize ``rgb`` to exactly ``scale`` times its size; ``progress(1, 1)`` once, like an untiled run.

        An exception raised by ``progress`` propagates unchanged, as with the real engine.
        """
        image = validate_rgb(rgb)
        if self.delay_seconds:
            time.sleep(self.delay_seconds)  # stands in for a network's run time: the worker thread is busy
        height, width = image.shape[:2]
        out = resize_pixels(image, width * self.scale, height * self.scale)
        np.clip(out, 0.0, 1.0, out=out)
        if progress is not None:
            progress(1, 1)
        return np.ascontiguousarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"ResizeUpscaler(scale={self.scale})"

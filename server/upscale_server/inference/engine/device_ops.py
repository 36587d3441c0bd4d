"""The device pipeline's tensor operations: resize, blending, padding, staging, error classes.

Everything here is plain torch on whatever device its tensors are on, so the CPU tests check the
exact code a GPU runs against the host path (:func:`upscale_server.imaging.resize_pixels`,
:func:`~upscale_server.inference.engine.tiling.blend_into`). Images are C x H x W float32 tensors.

* :func:`lanczos_resize` reproduces Pillow's ``Image.resize(..., LANCZOS)`` on float ("F") images:
  the same coefficients (support 3 scaled by the downscale factor, normalised per output pixel,
  window bounds rounded as Pillow rounds them), horizontal pass first, float32 in between. Pillow
  accumulates in double; float32 matrix products stay within about 1e-6 of it.
* :func:`blend_into` is the host blend's arithmetic (weights as a float32 outer product, one
  multiply-add) on a device canvas, so the native-scale output never crosses to the host.
* :func:`with_mask` / :func:`masked_call` let a window smaller than its bucket be padded without
  changing its output (masked zero padding).
* :class:`StagingPool` hands out reusable (pinned, on CUDA) host buffers: pinning memory is a slow
  driver call and a fresh buffer per window would make every copy wait for it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F

from upscale_server.inference.engine.tiling import Span, Tile, TilePlan

#: Pillow's Lanczos support (lobes) in pixels of the coarser grid.
LANCZOS_SUPPORT: Final = 3.0
#: Messages of cuDNN/cuBLAS failures that mean "too big for the resources now": the engine shrinks the
#: window as for out-of-memory instead of failing the request.
RESOURCE_ERRORS: Final = (
    "out of memory",
    "not enough memory",
    "cudnn_status_not_supported",
    "cudnn_status_alloc_failed",
    "cudnn error",
    "cublas_status_alloc_failed",
)


def is_resource_error(exc: BaseException) -> bool:
    """Out-of-memory, or a cuDNN/cuBLAS resource failure (large windows make cuDNN refuse a
    configuration or fail its workspace allocation): both are fixed by a smaller window."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in message for marker in RESOURCE_ERRORS)


# --------------------------------------------------------------------------- Lanczos


def _sinc(x: np.ndarray) -> np.ndarray:
    safe = np.where(x == 0.0, 1.0, x * np.pi)
    return np.where(x == 0.0, 1.0, np.sin(safe) / safe)


@functools.lru_cache(maxsize=64)
def lanczos_weights(in_size: int, out_size: int) -> np.ndarray:
    """The ``out_size`` x ``in_size`` float64 matrix of Pillow's Lanczos resample along one axis
    (``precompute_coeffs`` in Pillow's Resample.c, box = the whole axis)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = LANCZOS_SUPPORT * filterscale
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates like C's cast
        xmax = min(int(center + support + 0.5), in_size)
        x = (np.arange(xmin, xmax, dtype=np.float64) - center + 0.5) / filterscale
        w = np.where((x >= -LANCZOS_SUPPORT) & (x < LANCZOS_SUPPORT), _sinc(x) * _sinc(x / LANCZOS_SUPPORT), 0.0)
        total = w.sum()
        matrix[xx, xmin:xmax] = w / total if total != 0.0 else w
    return matrix


def lanczos_resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``image`` (C x H x W float32) resized to ``width`` x ``height`` as Pillow's Lanczos does per
    channel in float, clamped to [0, 1] like :func:`~upscale_server.imaging.resize_pixels`."""
    _, in_h, in_w = image.shape
    out = image
    if width != in_w:
        wx = torch.from_numpy(lanczos_weights(in_w, width).T.astype(np.float32)).to(image.device)
        out = out @ wx  # C x H x width
    if height != in_h:
        wy = torch.from_numpy(lanczos_weights(in_h, height).astype(np.float32)).to(image.device)
        out = wy @ out  # C x height x width
    if out is image:
        out = image.clone()
    return out.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- blending


def axis_weights(span: Span, length: int, scale: int, feather: int, device: torch.device) -> torch.Tensor:
    """:func:`~upscale_server.inference.engine.tiling.axis_weights` computed on ``device`` (same
    float64 formula, float32 result), so no weights are copied per window."""
    n = span.win_size * scale
    centres = torch.arange(n, dtype=torch.float64, device=device) + 0.5 + span.win_start * scale
    lo, hi = span.own_start * scale, span.own_end * scale
    if feather <= 0:
        weights = ((centres >= lo) & (centres < hi)).to(torch.float64)
    else:
        band = 2.0 * feather * scale
        ones = torch.ones(n, dtype=torch.float64, device=device)
        left = ones if span.own_start == 0 else ((centres - (lo - band / 2)) / band).clamp(0.0, 1.0)
        right = ones if span.own_end == length else (((hi + band / 2) - centres) / band).clamp(0.0, 1.0)
        weights = left * right
    return weights.to(torch.float32)


def _nonzero_range(span: Span, length: int, scale: int, feather: int) -> tuple[int, int]:
    """Where a span's weights are non-zero (output pixels, window-relative), found without a device sync."""
    n = span.win_size * scale
    if feather <= 0:
        lo, hi = span.own_start * scale, span.own_end * scale
    else:
        lo = 0 if span.own_start == 0 else (span.own_start - feather) * scale
        hi = length * scale if span.own_end == length else (span.own_end + feather) * scale
    start = max(0, lo - span.win_start * scale)
    end = min(n, hi - span.win_start * scale)
    return start, max(start, end)


def blend_into(
    canvas: torch.Tensor, tile_out: torch.Tensor, plan: TilePlan, tile: Tile, *, scale: int, feather: int
) -> None:
    """Add ``tile_out`` (C x h x w, the window output at ``scale``) times its feathered weights into
    ``canvas`` (C x H x W at ``scale``); the device form of the host ``blend_into``, same arithmetic."""
    device = canvas.device
    n_rows, n_cols = tile.rows.win_size * scale, tile.cols.win_size * scale
    if tuple(tile_out.shape[1:]) != (n_rows, n_cols):
        raise ValueError(f"tile output {tuple(tile_out.shape[1:])} does not match its window {(n_rows, n_cols)}")
    r0, r1 = _nonzero_range(tile.rows, plan.height, scale, feather)
    c0, c1 = _nonzero_range(tile.cols, plan.width, scale, feather)
    if r0 >= r1 or c0 >= c1:
        return
    row_w = axis_weights(tile.rows, plan.height, scale, feather, device)[r0:r1]
    col_w = axis_weights(tile.cols, plan.width, scale, feather, device)[c0:c1]
    top, left = tile.rows.win_start * scale, tile.cols.win_start * scale
    target = canvas[:, top + r0 : top + r1, left + c0 : left + c1]
    target += tile_out[:, r0:r1, c0:c1] * (row_w[:, None] * col_w[None, :])


# --------------------------------------------------------------------------- windows


def quantize_8bit(image: torch.Tensor) -> torch.Tensor:
    """``floor(clamp(x) * 255 + 0.5)`` as uint8, the rounding the host encoders use."""
    return (image.clamp(0.0, 1.0) * 255.0 + 0.5).clamp_(0.0, 255.0).to(torch.uint8)


# --------------------------------------------------------------------------- staging


class StagingPool:
    """Reusable host buffers for copies to and from the device; pinned when the device is CUDA.

    Buffers are flat uint8 tensors rounded up to 1 MiB, handed out by :meth:`acquire` and given back
    by :meth:`release`; a released buffer serves any later request it is large enough for. Idle
    buffers beyond ``keep_bytes`` are freed. Thread-safe.
    """

    _GRAIN: Final = 1 << 20

    def __init__(self, device: torch.device, *, keep_bytes: int = 1 << 30) -> None:
        self.pinned = device.type == "cuda"
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocations = 0  # buffers ever made: tests check reuse with it

    def acquire(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [b for b in self._free if b.numel() >= nbytes]
            if fits:
                best = min(fits, key=lambda b: b.numel())
                self._free.remove(best)
                return best
            self.allocations += 1
        size = max(self._GRAIN, -(-nbytes // self._GRAIN) * self._GRAIN)
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)

    def release(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
            while sum(b.numel() for b in self._free) > self.keep_bytes and self._free:
                self._free.remove(min(self._free, key=lambda b: b.numel()))


def view_as(buffer: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The first bytes of a flat uint8 ``buffer`` as a contiguous tensor of ``shape`` and ``dtype``."""
    count = int(np.prod(shape))
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    return buffer[:nbytes].view(dtype).view(shape)


# --------------------------------------------------------------------------- masked padding


def with_mask(x: torch.Tensor, height: int, width: int, side: int) -> torch.Tensor:
    """``x`` (1 x C x h x w) zero-padded to ``side`` x ``side`` with a validity channel appended (1 on
    the real ``height`` x ``width`` pixels): the form a padded window travels through the batcher in,
    so windows of different real sizes share one batch and each keeps its own mask."""
    padded = F.pad(x, (0, side - x.shape[3], 0, side - x.shape[2]))
    mask = torch.zeros((x.shape[0], 1, side, side), dtype=x.dtype, device=x.device)
    mask[:, :, :height, :width] = 1.0
    return torch.cat([padded, mask], dim=1)


def masked_call(
    module: torch.nn.Module, batch: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``run(images)`` for a :func:`with_mask` batch, every convolution's input multiplied by the mask
    (resized to its resolution): each conv then sees zeros beyond the real pixels, exactly as an
    unpadded run sees its zero padding, so the padding changes nothing inside the image.

    Padding alone cannot do that: reflect, replicate, zero or circular padding changes the border of
    realesr-animevideov3's output by 49-150 levels (docs/architecture.md). The hooks act only on this
    thread's call (others may be running the same module) and are removed afterwards.
    """
    images, mask = batch[:, :-1], batch[:, -1:]
    owner = threading.get_ident()
    resized: dict[tuple[int, int], torch.Tensor] = {}

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if threading.get_ident() != owner:
            return None
        x = args[0]
        size = (x.shape[2], x.shape[3])
        m = resized.get(size)
        if m is None:
            m = mask if size == tuple(mask.shape[2:]) else F.interpolate(mask, size=size, mode="nearest")
            resized[size] = m = m.to(x.dtype)
        return (x * m, *args[1:])

    convs = [m for m in module.modules() if _is_convolution(m)]
    handles = [conv.register_forward_pre_hook(hook) for conv in convs]
    try:
        return run(images.contiguous(memory_format=torch.channels_last))
    finally:
        for handle in handles:
            handle.remove()


def maskable(module: torch.nn.Module) -> bool:
    """Whether :func:`masked_call` works for ``module``: its convolutions are modules (``nn.Conv2d``, or
    marked ``is_convolution`` like the CPU's pre-packed ones); the CPU's Winograd form has none, and its
    windows then run at their real shape."""
    return any(_is_convolution(m) for m in module.modules())


def _is_convolution(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) or getattr(module, "is_convolution", False) is True

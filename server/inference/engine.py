"""The inference engine: one network, RGB float images in, upscaled RGB float images out.

Design points, each a lesson from Real-ESRGAN's ``RealESRGANer`` (see docs/anchors.md 1.2, 2.2, 2.3):

* **Stateless calls.** Everything a call needs lives in locals, so one :class:`Upscaler` can serve
  several threads at once (``RealESRGANer`` keeps per-call tensors on ``self`` and mixes up
  concurrent images, Real-ESRGAN#658). The only shared mutable state is the lazily built fp32
  fallback module and a "fallback already logged" flag, both behind a lock.
* **The whole image never goes to the device.** Tiles are cut on the host; each window (tile plus
  context) is copied to the device, run, and copied back (Real-ESRGAN#184: tiling after uploading
  the whole image does not prevent out-of-memory).
* **Tiled equals untiled.** Windows carry ``tile_overlap`` pixels of real context (64 for RRDB,
  whose zero-padding effect reaches far inward) and seams are feather-blended
  (:mod:`server.inference.tiling`), so the output matches an untiled run within 1 level on the
  0..255 scale for the real models.
* **Precision fallbacks.** fp16 on CUDA sometimes yields NaN or black output (Real-ESRGAN#632,
  #330): such tiles are redone in fp32. CUDA out-of-memory halves the tile and retries; any other
  failure is an :class:`~server.errors.InferenceError` with the traceback logged.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import threading
from collections.abc import Callable
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from server.errors import InferenceError
from server.inference.devices import free_memory_bytes
from server.inference.tiling import TilePlan, blend_into, max_feather, plan_tiles, tile_weights

logger = logging.getLogger(__name__)

FloatImage = npt.NDArray[np.float32]
Progress = Callable[[int, int], None]

#: Context pixels on each side of a tile, per architecture, when the caller gives none. Measured on
#: the real weights (fp32 CPU, photo crops, max |window - untiled| on 0..255 at distance d from a
#: window edge): x4plus 30 levels at d=16, 8.6 at 32, 3.5 at 48, 1.0 at 64 (RRDB's 350 stacked convs
#: carry the zero padding far inward); animevideov3 is exact from d=18 (its receptive radius). With the
#: quarter-overlap feather band the tiled result stays within 1 level of the untiled one.
DEFAULT_TILE_OVERLAP: Final = {"RRDBNet": 64, "SRVGGNetCompact": 32}
_FALLBACK_TILE_OVERLAP: Final = 64
#: Smallest tile (input pixels per side, without context) the out-of-memory back-off goes down to.
MIN_TILE: Final = 32
#: Share of the device's free memory one tile may use when the tile size is chosen automatically.
#: CUDA leaves room for cudnn workspaces and other models; the CPU for decoding, encoding and the
#: full-size float output buffer that lives on the host.
MEMORY_FRACTION: Final = {"cuda": 0.5, "cpu": 0.25}
#: An output tile whose maximum is below this is "black" (every pixel rounds to 0 in 8 bits) ...
_BLACK_OUTPUT: Final = 0.5 / 255
#: ... which is suspicious only when the input tile has something visible in it.
_VISIBLE_INPUT: Final = 4 / 255
#: Input-side multiple for RRDBNet variants that pixel-unshuffle (x2: by 2, x1: by 4).
_UNSHUFFLE_MULTIPLE: Final = {2: 2, 1: 4}


class NetworkInfo(Protocol):
    """What the engine needs to know about a network (``loading.ArchInfo`` satisfies it)."""

    @property
    def arch(self) -> str: ...

    @property
    def scale(self) -> int: ...


class Network(Protocol):
    """A loaded network (``loading.LoadedNetwork`` satisfies it): fp32 module on the CPU, in eval mode."""

    @property
    def module(self) -> nn.Module: ...

    @property
    def info(self) -> NetworkInfo: ...


class _OutOfMemoryError(Exception):
    """Internal: a tile did not fit; the caller retries with smaller tiles."""


def bytes_per_input_pixel(arch: str, scale: int, dtype: torch.dtype) -> int:
    """Estimated peak activation memory per input pixel of a window, in bytes (an estimate, not a bound).

    RRDBNet's peak is at output resolution: about three live 64-channel tensors per output pixel
    (upsampled features, conv output, the next conv's output), i.e. ``3 * 64 * scale**2`` values per
    input pixel, plus about 600 values at input resolution for the dense blocks' concatenations.
    SRVGGNetCompact stays at input resolution (a few 64-channel tensors) until the final pixel
    shuffle. A 1.5x margin covers allocator rounding and temporaries; out-of-memory back-off covers
    the rest.
    """
    element = torch.empty((), dtype=dtype).element_size()
    rrdb = 3 * 64 * scale * scale + 600
    values = rrdb if arch == "RRDBNet" else 4 * 64 + 2 * 3 * scale * scale + 48
    return int(values * element * 1.5)


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises ``torch.OutOfMemoryError``; older paths and the CPU allocator raise RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "not enough memory" in message)


def _placed(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move ``module`` (in place) to ``device``/``dtype`` with 4-D weights in ``channels_last``.

    channels_last lets oneDNN (CPU) and cudnn (CUDA) skip layout conversions around every conv;
    measured about 25% faster for x4plus fp32 on the CPU (docs weights.md).
    """
    module.to(device=device, dtype=dtype)
    for param in module.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)
    return module


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


class Upscaler:
    """Runs one network over RGB images.

    Contract: input float32 numpy H x W x 3, RGB, values in [0, 1], on the host; output float32 numpy
    (H*scale) x (W*scale) x 3 in [0, 1] (clamped), on the host. Thread-safe: calls keep their state in
    locals, and the module is only read. Broken inputs raise ValueError; a network failure that the
    fallbacks (smaller tiles, fp32) cannot fix raises :class:`~server.errors.InferenceError`.

    Precision modes, by ``(device, dtype)``:

    * CPU fp32 (exact): ``torch.inference_mode`` with the module in ``channels_last`` (faster on CPU).
    * CPU bf16 (fast, a few levels off): ``torch.autocast("cpu", bfloat16)`` over the fp32 module.
    * CUDA fp16/bf16: a reduced-precision copy of the module on the device; a tile that comes out
      NaN/Inf, or black from a visible input, is redone with an fp32 copy made on first need.
    * CUDA fp32: an fp32 copy on the device.

    The Upscaler takes over ``network.module``: on the CPU it is converted to ``channels_last`` in
    place (no second copy of the weights); on CUDA it stays the untouched fp32 host master from
    which device copies are made.

    Models that pixel-unshuffle (RRDBNet at scale 2 or 1) need input sides divisible by 2 or 4: the
    image is padded at its bottom/right by reflection to the next multiple, run, and the output is
    cropped, so callers can pass any size. Tile windows then start and end on that grid too, so a
    tiled run sees the same unshuffle phase as an untiled one.
    """

    def __init__(
        self,
        network: Network,
        *,
        device: torch.device,
        dtype: torch.dtype,
        tile_size: int = 0,
        tile_overlap: int | None = None,
        feather: int | None = None,
    ) -> None:
        """``tile_size`` 0 picks the tile from free memory (:meth:`tile_size_for`); ``tile_overlap`` is
        the context in input pixels on each side of a tile (None: :data:`DEFAULT_TILE_OVERLAP` for the
        architecture); ``feather`` the half-width of the seam blend band (default a quarter of the
        overlap, so every pixel with weight keeps at least 3/4 of the context; reduced where a
        plan's tiles are too small)."""
        if tile_overlap is None:
            tile_overlap = DEFAULT_TILE_OVERLAP.get(network.info.arch, _FALLBACK_TILE_OVERLAP)
        if tile_size < 0 or tile_overlap < 0 or (feather is not None and feather < 0):
            raise ValueError("tile_size, tile_overlap and feather must be >= 0")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype}: use float32, float16 or bfloat16")
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("float16 is a CUDA mode (see devices.resolve_dtype); on the CPU use float32 or bfloat16")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {device}")
        self.device = device
        self.dtype = dtype
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.feather = tile_overlap // 4 if feather is None else min(feather, tile_overlap)
        self.arch = network.info.arch
        self.scale: int = network.info.scale
        self.multiple = _UNSHUFFLE_MULTIPLE.get(self.scale, 1) if self.arch == "RRDBNet" else 1

        master = network.module.eval()
        self._lock = threading.Lock()
        self._fallback_logged = False
        self._master: nn.Module | None
        self._fp32_module: nn.Module | None
        if device.type == "cpu":
            # bf16 on the CPU is autocast over the fp32 weights, so one module serves both modes.
            self._module = _placed(master, device, torch.float32)
            self._fp32_module = self._module
            self._master = None
        else:
            self._master = master
            self._module = _placed(copy.deepcopy(master), device, dtype)
            self._fp32_module = self._module if dtype == torch.float32 else None
        self._exact = dtype == torch.float32

    # ------------------------------------------------------------------ public API

    def tile_size_for(self, height: int, width: int) -> int:
        """The tile edge (input pixels, without context) used for a ``height`` x ``width`` image.

        An explicit ``tile_size`` wins. Otherwise a window of ``tile + 2 * overlap`` per side must
        need at most :data:`MEMORY_FRACTION` of the device's free memory, by the per-architecture
        estimate :func:`bytes_per_input_pixel`; an image that fits in that budget whole is not tiled
        (the result is then ``max(height, width)``). Never below :data:`MIN_TILE`.
        """
        if self.tile_size:
            return self.tile_size
        per_pixel = bytes_per_input_pixel(self.arch, self.scale, self.dtype)
        budget = free_memory_bytes(self.device) * MEMORY_FRACTION[self.device.type]
        if height * width * per_pixel <= budget:
            return max(height, width)
        side = math.isqrt(int(budget // per_pixel)) - 2 * self.tile_overlap
        return max(MIN_TILE, side // 8 * 8)

    def upscale(self, rgb: np.ndarray, *, progress: Progress | None = None) -> FloatImage:
        """Upscale ``rgb`` (see the class contract); ``progress(done_tiles, total_tiles)`` after each tile.

        After an out-of-memory retry with smaller tiles, progress restarts from 0 with the new total.
        An exception raised by ``progress`` aborts the call and propagates unchanged (a way to cancel).
        """
        image = validate_rgb(rgb)
        height, width = image.shape[:2]
        padded = self._pad_to_multiple(image)
        tile = min(self.tile_size_for(*padded.shape[:2]), max(padded.shape[:2]))
        while True:
            try:
                out = self._run(padded, tile, progress)
                break
            except _OutOfMemoryError as exc:
                self._release_memory()
                smaller = tile // 2
                if smaller < MIN_TILE:
                    raise InferenceError(
                        f"out of memory on {self.device} even with {tile}px tiles; free memory on the "
                        "device or use a smaller image"
                    ) from (exc.__cause__ or exc)
                logger.warning("out of memory on %s with %dpx tiles; retrying with %dpx", self.device, tile, smaller)
                tile = smaller
        out = out[: height * self.scale, : width * self.scale]
        np.clip(out, 0.0, 1.0, out=out)
        return np.ascontiguousarray(out)

    # ------------------------------------------------------------------ internals

    def _pad_to_multiple(self, image: FloatImage) -> FloatImage:
        pad_h = -image.shape[0] % self.multiple
        pad_w = -image.shape[1] % self.multiple
        if not (pad_h or pad_w):
            return image
        # Reflection, not zeros: a black band would bleed into the real border through the convs.
        return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")

    def _run(self, image: FloatImage, tile: int, progress: Progress | None) -> FloatImage:
        height, width = image.shape[:2]
        plan: TilePlan = plan_tiles(height, width, tile, self.tile_overlap, self.multiple)
        total = len(plan)
        if total == 1:
            out = self._run_window(image)
            if progress is not None:
                progress(1, 1)
            return out
        feather = min(self.feather, max_feather(plan))
        out = np.zeros((height * self.scale, width * self.scale, 3), dtype=np.float32)
        for done, tile_spec in enumerate(plan.tiles, start=1):
            result = self._run_window(image[tile_spec.window])
            blend_into(out, result, tile_spec, tile_weights(plan, tile_spec, self.scale, feather), self.scale)
            if progress is not None:
                progress(done, total)
        return out

    def _run_window(self, window: FloatImage) -> FloatImage:
        """Run one window (H x W x 3 host view) and return its unclamped output on the host."""
        h, w = window.shape[:2]
        # A contiguous HWC copy viewed as NCHW is already channels_last: no layout copy needed.
        x = torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1).unsqueeze(0)
        x = x.to(self.device, non_blocking=False)
        y = self._forward(x, exact=self._exact)
        if not self._exact:
            problem = self._suspicious(x, y)
            if problem is not None:
                self._log_fallback(problem)
                y = self._forward(x, exact=True)
        if not bool(torch.isfinite(y).all()):
            raise InferenceError("the network produced non-finite values in full precision")
        expected = (1, 3, h * self.scale, w * self.scale)
        if tuple(y.shape) != expected:
            raise InferenceError(f"the network returned shape {tuple(y.shape)} for a {h}x{w} tile, expected {expected}")
        # channels_last output makes this permute a contiguous HWC view.
        out: FloatImage = y[0].permute(1, 2, 0).cpu().numpy()
        return out

    def _forward(self, x: torch.Tensor, *, exact: bool) -> torch.Tensor:
        """One network pass; float32 result on the device. Maps failures to the engine's errors."""
        try:
            with torch.inference_mode():
                if exact:
                    y = self._exact_module()(x)
                elif self.device.type == "cpu":
                    with torch.autocast("cpu", dtype=self.dtype):
                        y = self._module(x)
                else:
                    y = self._module(x.to(self.dtype))
                result: torch.Tensor = y.float()
                return result
        except InferenceError:
            raise
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise _OutOfMemoryError(str(exc)) from exc
            logger.exception("network %s failed on a %s tile", self.arch, tuple(x.shape))
            raise InferenceError(f"the {self.arch} network failed on a {x.shape[2]}x{x.shape[3]} tile: {exc}") from exc

    def _exact_module(self) -> nn.Module:
        """The fp32 module on the device, copied from the host master on first need (under the lock)."""
        module = self._fp32_module
        if module is not None:
            return module
        with self._lock:
            if self._fp32_module is None:
                assert self._master is not None  # only CUDA reduced precision starts without one
                self._fp32_module = _placed(copy.deepcopy(self._master), self.device, torch.float32)
            return self._fp32_module

    @staticmethod
    def _suspicious(x: torch.Tensor, y: torch.Tensor) -> str | None:
        """Why a reduced-precision tile must be redone in fp32, or None when it looks sane."""
        if not bool(torch.isfinite(y).all()):
            return "NaN/Inf values"
        if float(y.amax()) < _BLACK_OUTPUT and float(x.amax()) > _VISIBLE_INPUT:
            return "an all-black tile from a visible input"
        return None

    def _log_fallback(self, problem: str) -> None:
        with self._lock:
            first = not self._fallback_logged
            self._fallback_logged = True
        if first:
            logger.warning(
                "%s %s produced %s; redoing such tiles in fp32 (logged once)", self.arch, self.dtype, problem
            )

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

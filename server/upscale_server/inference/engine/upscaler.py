"""The inference engine: one network, RGB float images in, upscaled RGB float images out.

Design points, each a lesson from Real-ESRGAN's ``RealESRGANer`` and the issues reported against it:

* **Stateless calls.** Everything a call needs lives in locals, so one :class:`Upscaler` can serve
  several threads at once (``RealESRGANer`` keeps per-call tensors on ``self`` and mixes up
  concurrent images, Real-ESRGAN#658). The only shared mutable state is the lazily built fp32
  fallback module and a "fallback already logged" flag, both behind a lock.
* **The whole image never goes to the device.** Tiles are cut on the host; each window (tile plus
  context) is copied to the device, run, and copied back (Real-ESRGAN#184: tiling after uploading
  the whole image does not prevent out-of-memory).
* **Tiled equals untiled.** Windows carry ``tile_overlap`` pixels of real context (by default the
  architecture's ``default_tile_overlap``: 64 for RRDB, whose zero-padding effect reaches far inward)
  and seams are feather-blended (:mod:`upscale_server.inference.engine.tiling`), so the output matches
  an untiled run within 1 level on the 0..255 scale for the real models.
* **Precision fallbacks.** fp16 on CUDA sometimes yields NaN or black output (Real-ESRGAN#632,
  #330): such tiles are redone in fp32. An architecture without a half or bf16 mode (its
  descriptor's ``supports_half``/``supports_bf16``) runs in fp32. CUDA out-of-memory halves the tile
  and retries; any other failure is an :class:`~upscale_server.errors.InferenceError` with the
  traceback logged.
* **The output is made at the size asked for.** With ``out_size`` below the native scale (x4 network,
  factor 2) each window's output is Lanczos-resized to the target scale before blending, so the full
  native-scale canvas (805 MB for 2048x2048 at x4) never exists. Windows keep their context through
  the resize, so the result matches "upscale, then resize the whole image" within the tiling tolerance.
* **The device is kept busy.** On CUDA windows are copied from pinned memory on a side stream while the
  previous window computes; one-window 8-bit results are quantised on the device (a quarter of the
  bytes to copy back); tiles of concurrent requests can share one pass through a
  :class:`~upscale_server.inference.runtime.batching.DynamicBatcher`; ``torch.compile`` is opt-in.
"""

from __future__ import annotations

import copy
import gc
import importlib
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final, Protocol, TypeVar, get_args

import numpy as np
import torch
from torch import nn

from upscale_server.config import Convolution
from upscale_server.errors import InferenceError
from upscale_server.imaging import resize_pixels
from upscale_server.inference.archs.base import Architecture
from upscale_server.inference.cpu import methods
from upscale_server.inference.cpu.methods import CpuMethod, Runner, is_exact
from upscale_server.inference.cpu.tuning import (
    SHAPE_CLASSES,
    Choice,
    MethodTable,
    fastest_exact,
    probe_seconds,
    shape_class,
)
from upscale_server.inference.engine import device_ops
from upscale_server.inference.engine.base import FloatImage, Progress, validate_rgb
from upscale_server.inference.engine.buckets import (
    batch_fits,
    bucket_tile,
    choose_bucket,
    fp32_split_side,
    smaller_bucket,
    tiling_buckets,
    usable_buckets,
    window_cap,
)
from upscale_server.inference.engine.tiling import (
    Tile,
    TilePlan,
    blend_into,
    max_feather,
    plan_tiles,
    tile_weights,
    trim_tile,
)
from upscale_server.inference.runtime.batching import BatcherClosedError, BatcherTimeoutError, DynamicBatcher
from upscale_server.inference.runtime.devices import free_memory_bytes

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Smallest tile (input pixels per side, without context) the out-of-memory back-off goes down to.
MIN_TILE: Final = 32
#: Share of the device's free memory one tile may use when the tile size is chosen automatically.
#: CUDA leaves room for cudnn workspaces and other models. On the CPU it is a trade: every split
#: costs twice the context around each seam in recomputation (a 512x512 x4plus input cut into four
#: 320x320 windows runs 1.56x the pixels) and seams are where a tiled result can differ from an
#: untiled one, while bigger windows raise the peak memory of big images. A third keeps a 512x512
#: x4plus input (6.4 GB by the estimate) whole on a 24 GB machine, and still cuts a 2048x2048
#: animevideov3 input in four, which then peaks under 3 GB (docs/benchmarks.md).
MEMORY_FRACTION: Final = {"cuda": 0.5, "cpu": 0.35}
#: An output tile whose maximum is below this is "black" (every pixel rounds to 0 in 8 bits) ...
_BLACK_OUTPUT: Final = 0.5 / 255
#: ... which is suspicious only when the input tile has something visible in it.
_VISIBLE_INPUT: Final = 4 / 255
#: CPU exact-mode convolution algorithms (see :mod:`upscale_server.inference.cpu.methods`).
CONVOLUTIONS: Final = get_args(Convolution)
#: Support of Pillow's Lanczos filter, in pixels of the smaller of the two grids it maps between.
_LANCZOS_SUPPORT: Final = 3


class NetworkInfo(Protocol):
    """What the engine reads of a network's :class:`~upscale_server.inference.archs.base.ArchInfo`."""

    @property
    def scale(self) -> int: ...

    @property
    def params(self) -> Mapping[str, int | str]: ...


class Network(Protocol):
    """A loaded network (``weights.loading.LoadedNetwork`` satisfies it): fp32 module on the CPU, in
    eval mode, with its architecture's descriptor."""

    @property
    def module(self) -> nn.Module: ...

    @property
    def arch(self) -> Architecture: ...

    @property
    def info(self) -> NetworkInfo: ...


class _OutOfMemoryError(Exception):
    """Internal: a tile did not fit; the caller retries with smaller tiles."""


def bytes_per_input_pixel(arch: Architecture, scale: int, dtype: torch.dtype) -> int:
    """Estimated peak activation memory per input pixel of a window, in bytes (an estimate, not a bound).

    The architecture's memory model (its ``peak_values_per_input_pixel``) in ``dtype``, with a 1.5x
    margin for allocator rounding and temporaries; out-of-memory back-off covers the rest.
    """
    element = torch.empty((), dtype=dtype).element_size()
    return int(arch.peak_values_per_input_pixel(scale) * element * 1.5)


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises ``torch.OutOfMemoryError``; older paths and the CPU allocator raise RuntimeError;
    cuDNN/cuBLAS resource failures are fixed by smaller windows too (:func:`device_ops.is_resource_error`);
    the Winograd kernel raises MemoryError when one of its own allocations fails."""
    return isinstance(exc, MemoryError) or device_ops.is_resource_error(exc)


def _placed(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move ``module`` (in place) to ``device``/``dtype`` with 4-D weights in ``channels_last``.

    channels_last lets oneDNN (CPU) and cudnn (CUDA) skip layout conversions around every conv;
    measured about 25% faster for x4plus fp32 on the CPU.
    """
    module.to(device=device, dtype=dtype)
    for param in module.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)
    return module


class Upscaler:
    """Runs one network over RGB images.

    Contract: input float32 numpy H x W x 3, RGB, values in [0, 1], on the host; output float32 numpy
    (H*scale) x (W*scale) x 3 in [0, 1] (clamped), on the host, or the ``out_size`` asked for.
    Thread-safe: calls keep their state in locals, and the module is only read. Broken inputs raise
    ValueError; a network failure that the fallbacks (smaller tiles, fp32) cannot fix raises
    :class:`~upscale_server.errors.InferenceError`.

    Precision modes, by ``(device, dtype)``:

    * CPU: one of the methods of :mod:`upscale_server.inference.cpu.methods` per window shape class:
      exact fp32 (Winograd or oneDNN direct) or the bf16 fast mode, as ``cpu_methods`` allows; with a
      ``method_table`` the fastest is measured once per machine, without one the first is used.
    * CUDA fp16/bf16: a reduced-precision copy of the module on the device; a tile that comes out
      NaN/Inf, or black from a visible input, is redone with an fp32 copy made on first need.
    * CUDA fp32: an fp32 copy on the device.

    The Upscaler takes over ``network.module``: on the CPU it is converted to ``channels_last`` in
    place (no second copy of the weights); on CUDA it stays the untouched fp32 host master from
    which device copies are made.

    Architectures whose input sides must be a multiple (the descriptor's ``size_multiple``: RRDBNet
    pixel-unshuffles by 2 or 4 at scale 2 or 1) get the image padded at its bottom/right by
    reflection to the next multiple, run, and the output cropped, so callers can pass any size. Tile
    windows then start and end on that grid too, so a tiled run sees the same unshuffle phase as an
    untiled one.
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
        batcher: DynamicBatcher | None = None,
        compile_module: bool = False,
        convolution: str = "auto",
        cpu_methods: Sequence[CpuMethod] | None = None,
        method_table: MethodTable | None = None,
        device_pipeline: bool | None = None,
    ) -> None:
        """``tile_size`` 0 picks the tile from free memory (:meth:`tile_size_for`); ``tile_overlap`` is
        the context in input pixels on each side of a tile (None: the architecture's
        ``default_tile_overlap``); ``feather`` the half-width of the seam blend band (default a
        quarter of the overlap, so every pixel with weight keeps at least 3/4 of the context; reduced
        where a plan's tiles are too small). ``batcher`` shares network passes with other calls (and other
        upscalers) that send same-shaped windows; ``compile_module`` runs the network through
        ``torch.compile``, compiled on first use, falling back to eager (one warning) if that fails.
        ``convolution`` picks the CPU exact mode's 3x3 convolutions: ``"winograd"``
        (:mod:`upscale_server.inference.cpu.winograd`, ValueError when its kernel cannot be had),
        ``"direct"`` (oneDNN), or ``"auto"`` (Winograd when available, else direct); ignored on CUDA.
        ``cpu_methods`` (CPU only) replaces what ``dtype`` and ``convolution`` imply with explicit
        candidates; ``method_table`` picks among them by measurement (else the first is used).
        ``device_pipeline`` (None: on CUDA only) runs windows in bucketed shapes and resizes, blends and
        quantises on the device (:meth:`_upscale_on_device`); True on the CPU is for tests."""
        arch = network.arch
        if tile_overlap is None:
            tile_overlap = arch.default_tile_overlap
        if tile_size < 0 or tile_overlap < 0 or (feather is not None and feather < 0):
            raise ValueError("tile_size, tile_overlap and feather must be >= 0")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype}: use float32, float16 or bfloat16")
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("float16 is a CUDA mode (see devices.resolve_dtype); on the CPU use float32 or bfloat16")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {device}")
        if convolution not in CONVOLUTIONS:
            raise ValueError(f"convolution must be one of {', '.join(CONVOLUTIONS)}, got {convolution!r}")
        supported = {torch.float16: arch.supports_half, torch.bfloat16: arch.supports_bf16}.get(dtype, True)
        if not supported:
            logger.warning("%s has no %s mode; running it in float32", arch.name, str(dtype).removeprefix("torch."))
            dtype = torch.float32
        self.device = device
        self.dtype = dtype
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.feather = tile_overlap // 4 if feather is None else min(feather, tile_overlap)
        self.arch = arch
        self.scale: int = network.info.scale
        self.multiple = arch.size_multiple(self.scale)
        self.batcher = batcher
        self.compile_module = compile_module

        self._lock = threading.Lock()
        self._fallback_logged = False
        # Compiled wrappers by id() of the eager module they wrap; empty and unused after a failure.
        self._compiled: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._compile_failed = False
        self._method_table = method_table
        self._runners: dict[CpuMethod, Runner] = {}
        self._network_key = f"{arch.name} x{self.scale} " + json.dumps(dict(network.info.params), sort_keys=True)
        pipeline = device.type == "cuda" if device_pipeline is None else device_pipeline
        if pipeline and device.type == "cpu":
            # The device pipeline on the CPU is for tests; its masked passes hook module convolutions,
            # which the Winograd form does not have.
            cpu_methods = ("bf16",) if dtype == torch.bfloat16 else ("direct",)
        self._init_modules(network.module.eval(), cpu_methods, convolution)
        self._init_device_pipeline(pipeline)

    def _init_modules(self, master: nn.Module, cpu_methods: Sequence[CpuMethod] | None, convolution: str) -> None:
        """The modules of each mode: on the CPU every method over one fp32 module (no second copy of
        the fp32 weights); on CUDA a device copy in the compute dtype, the fp32 one made on first need."""
        self._master: nn.Module | None = None
        self._fp32_module: nn.Module | None = None
        self._cpu_methods: tuple[CpuMethod, ...] = ()
        if self.device.type == "cpu":
            self._module = _placed(master, self.device, torch.float32)
            self._cpu_methods = self._resolve_cpu_methods(cpu_methods, self.dtype, convolution)
            self.dtype = torch.bfloat16 if self._cpu_methods == ("bf16",) else torch.float32
        else:
            self._master = master
            self._module = _placed(copy.deepcopy(master), self.device, self.dtype)
            self._fp32_module = self._module if self.dtype == torch.float32 else None
            # Exact mode (and fp16's fp32 fallback) must be fp32, not TF32's 10-bit mantissa.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self._exact = self.dtype == torch.float32

    def _init_device_pipeline(self, enabled: bool) -> None:
        self._device_pipeline = enabled
        self._staging = device_ops.StagingPool(self.device)
        self._max_batch = self.batcher.max_batch if self.batcher is not None else 1
        cap = window_cap(self.arch.largest_activation_per_input_pixel(self.scale), self._max_batch)
        #: Window sides the device pipeline runs (tests may narrow them).
        self._buckets = usable_buckets(cap)
        #: Shapes warm_up() ran: on the device pipeline only these use the compiled module.
        self._compiled_shapes: set[tuple[int, ...]] = set()
        self._eager_only = threading.local()

    # ------------------------------------------------------------------ public API

    @property
    def cpu_methods(self) -> tuple[CpuMethod, ...]:
        """The CPU methods this upscaler may choose among (empty on CUDA)."""
        return self._cpu_methods

    def cpu_choice(self, height: int, width: int) -> Choice:
        """The CPU method for a ``height`` x ``width`` window, and why (measured on first need)."""
        shape = shape_class(height, width)
        if self._method_table is None or len(self._cpu_methods) == 1:
            reason = "only candidate" if len(self._cpu_methods) == 1 else "not measured"
            return Choice(self._cpu_methods[0], shape.name, shape.probe, {}, reason)
        return self._method_table.choose(self._network_key, height, width, self._cpu_methods, self._probe)

    def choose_cpu_methods(self) -> list[Choice]:
        """Measure (or read) the choice for every window shape class now, e.g. at start-up."""
        return [self.cpu_choice(c.probe, c.probe) for c in SHAPE_CLASSES]

    def tile_size_for(self, height: int, width: int) -> int:
        """The tile edge (input pixels, without context) used for a ``height`` x ``width`` image.

        An explicit ``tile_size`` wins. Otherwise a window of ``tile + 2 * overlap`` per side must
        need at most :data:`MEMORY_FRACTION` of the device's free memory, by the per-architecture
        estimate :func:`bytes_per_input_pixel`; an image that fits in that budget whole is not tiled
        (the result is then ``max(height, width)``). Never below :data:`MIN_TILE`.

        Within the budget the image is split evenly: windows never shrink at the image edge, so the
        largest tile that fits can waste most of a window (a 2048 side in 1528-pixel tiles runs two
        1592-pixel windows, 2.4x the pixels and memory of two 1056-pixel ones for the same count).
        """
        if self._device_pipeline:
            side = self._bucket_for(height, width)
            return (
                max(height, width)
                if side >= max(height, width)
                else bucket_tile(side, self.tile_overlap, self.multiple)
            )
        if self.tile_size:
            return self.tile_size
        per_pixel = bytes_per_input_pixel(self.arch, self.scale, self.dtype)
        budget = free_memory_bytes(self.device) * MEMORY_FRACTION[self.device.type]
        if height * width * per_pixel <= budget:
            return max(height, width)
        side = math.isqrt(int(budget // per_pixel)) - 2 * self.tile_overlap
        largest = max(MIN_TILE, side // 8 * 8)
        candidates = {largest, *(self._even_tile(length, largest) for length in (height, width))}
        return min(candidates, key=lambda tile: (self._window_pixels(height, width, tile), -tile))

    def _even_tile(self, length: int, largest: int) -> int:
        """The smallest tile (a multiple of 8, at most ``largest``) that cuts ``length`` into as few
        tiles as ``largest`` does."""
        inner = max(1, length - 2 * self.tile_overlap)
        count = -(-inner // largest)
        even = -(-inner // count)
        return max(MIN_TILE, min(largest, -(-even // 8) * 8))

    def _window_pixels(self, height: int, width: int, tile: int) -> int:
        """Input pixels the network runs over (context included) with ``tile``: its cost in time."""
        window = tile + 2 * self.tile_overlap

        def along(length: int) -> int:
            return length if length <= window else -(-(length - 2 * self.tile_overlap) // tile) * window

        return along(height) * along(width)

    def upscale(
        self,
        rgb: np.ndarray,
        *,
        progress: Progress | None = None,
        out_size: tuple[int, int] | None = None,
        quantize_8bit: bool = False,
    ) -> FloatImage:
        """Upscale ``rgb`` (see the class contract); ``progress(done_tiles, total_tiles)`` after each tile.

        ``out_size`` (width, height) asks for another output size than the native scale, as a Lanczos
        resize (:func:`~upscale_server.imaging.resize_pixels`) of the native output would give it. When it is
        an integer multiple of the input each window is resized on its own, so the native-scale image
        is never held in memory; other sizes resize the whole native output.

        ``quantize_8bit`` tells the engine the caller stores the result in 8 bits: a one-window result
        at the native scale is then quantised on the device (rounding half up, like the encoders) and
        comes back as the exact floats ``k / 255``, which quantise to the same ``k`` again. Other
        results are returned unquantised.

        After an out-of-memory retry with smaller tiles, progress restarts from 0 with the new total.
        An exception raised by ``progress`` aborts the call and propagates unchanged (a way to cancel).
        """
        image = validate_rgb(rgb)
        height, width = image.shape[:2]
        native = (width * self.scale, height * self.scale)
        out_w, out_h = native if out_size is None else out_size
        if out_w < 1 or out_h < 1:
            raise ValueError(f"out_size must be positive, got {out_w}x{out_h}")
        if self._device_pipeline:
            return self._upscale_on_device(image, (out_w, out_h), progress, quantize_8bit)
        padded = self._pad_to_multiple(image)
        target = self._window_target(image, padded, (out_w, out_h))
        quantize = quantize_8bit and (out_w, out_h) == native
        out = self._shrinking_on_oom(
            lambda tile: self._run(padded, tile, progress, target, quantize),
            min(self.tile_size_for(*padded.shape[:2]), max(padded.shape[:2])),
            lambda tile: tile // 2 if tile // 2 >= MIN_TILE else None,
            "tiles",
        )
        out = out[: height * target, : width * target]
        if out.dtype == np.uint8:
            # The floats an 8-bit decoder produces: each quantises back to the same k.
            floats: FloatImage = np.multiply(out, np.float32(1.0 / 255.0), dtype=np.float32)
            return floats
        np.clip(out, 0.0, 1.0, out=out)
        if (out.shape[1], out.shape[0]) != (out_w, out_h):
            return resize_pixels(out, out_w, out_h)
        return np.ascontiguousarray(out)

    # ------------------------------------------------------------------ internals

    def _window_target(self, image: FloatImage, padded: FloatImage, out_size: tuple[int, int]) -> int:
        """The scale windows are made at: ``out_size``'s integer factor when each window can be resized on
        its own, else the native scale (the whole output is resized at the end).

        Per-window resizing needs every window edge on the target grid, no padding to crop away, and
        room in the context for the filter beyond the blend band."""
        height, width = image.shape[:2]
        out_w, out_h = out_size
        target = out_w // width
        per_window = (
            (out_w, out_h) == (width * target, height * target)
            and padded is image
            and self.feather + self._resize_margin(target) <= self.tile_overlap
        )
        return target if per_window else self.scale

    def _shrinking_on_oom(
        self, run: Callable[[int], _T], size: int, smaller: Callable[[int], int | None], unit: str
    ) -> _T:
        """``run(size)``, retried with ``smaller(size)`` after each out-of-memory (or resource) error
        until it fits; InferenceError once there is nothing smaller. ``unit`` names what ``size`` sizes."""
        while True:
            try:
                return run(size)
            except _OutOfMemoryError as exc:
                self._release_memory()
                step = smaller(size)
                if step is None:
                    raise InferenceError(
                        f"out of memory on {self.device} even with {size}px {unit}; free memory on the "
                        "device or use a smaller image"
                    ) from (exc.__cause__ or exc)
                logger.warning("out of memory on %s with %dpx %s; retrying with %dpx", self.device, size, unit, step)
                size = step

    def _pad_to_multiple(self, image: FloatImage) -> FloatImage:
        pad_h = -image.shape[0] % self.multiple
        pad_w = -image.shape[1] % self.multiple
        if not (pad_h or pad_w):
            return image
        # Reflection, not zeros: a black band would bleed into the real border through the convs.
        return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")

    def _run(self, image: FloatImage, tile: int, progress: Progress | None, target: int, quantize: bool) -> np.ndarray:
        """The output at ``target`` x the input (the native scale, or a per-window resize to it);
        uint8 when ``quantize`` and the image is one window at the native scale, else float32."""
        height, width = image.shape[:2]
        plan: TilePlan = plan_tiles(height, width, tile, self.tile_overlap, self.multiple)
        total = len(plan)
        if total == 1:
            ((_, x),) = self._uploads(image, plan.tiles)
            out = self._run_window(x, quantize=quantize and target == self.scale)
            if target != self.scale:
                np.clip(out, 0.0, 1.0, out=out)
                out = resize_pixels(out, width * target, height * target)
            if progress is not None:
                progress(1, 1)
            return out
        feather = min(self.feather, max_feather(plan))
        margin = self._resize_margin(target)
        out = np.zeros((height * target, width * target, 3), dtype=np.float32)
        for done, (tile_spec, x) in enumerate(self._uploads(image, plan.tiles), start=1):
            result = self._run_window(x, quantize=False)
            blended = tile_spec
            if target != self.scale:
                blended = trim_tile(plan, tile_spec, feather, margin)
                result = self._resize_window(result, tile_spec, blended, target)
            blend_into(out, result, blended, tile_weights(plan, blended, target, feather), target)
            del result
            if progress is not None:
                progress(done, total)
        return out

    def _resize_margin(self, target: int) -> int:
        """How far (input pixels) a Lanczos resize from the native scale to ``target`` reads around a
        pixel: Pillow's support is 3 pixels of the coarser grid, plus one for its rounding."""
        return -(-_LANCZOS_SUPPORT // min(target, self.scale)) + 1

    def _resize_window(self, result: FloatImage, tile: Tile, trimmed: Tile, target: int) -> FloatImage:
        """The ``trimmed`` part of a window's native output (``result``, for ``tile``), clamped, then
        Lanczos-resized from the native scale to ``target`` (clamped first, as the whole native output
        would be before a whole-image resize)."""
        r0 = (trimmed.rows.win_start - tile.rows.win_start) * self.scale
        c0 = (trimmed.cols.win_start - tile.cols.win_start) * self.scale
        part = result[r0 : r0 + trimmed.rows.win_size * self.scale, c0 : c0 + trimmed.cols.win_size * self.scale]
        np.clip(part, 0.0, 1.0, out=part)
        return resize_pixels(part, trimmed.cols.win_size * target, trimmed.rows.win_size * target)

    def _uploads(self, image: FloatImage, tiles: Sequence[Tile]) -> Iterator[tuple[Tile, torch.Tensor]]:
        """Each tile with its window as a 1 x 3 x H x W tensor on the device, ready to use.

        On CUDA the windows go through pinned memory and a side stream, and the next window is already
        being copied while the caller computes the current one. On the CPU a window is a zero-copy view
        of a contiguous host copy, as before.
        """
        if self.device.type == "cpu":
            for tile in tiles:
                # A contiguous HWC copy viewed as NCHW is already channels_last: no layout copy needed.
                yield tile, torch.from_numpy(np.ascontiguousarray(image[tile.window])).permute(2, 0, 1).unsqueeze(0)
            return
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        pending = self._upload_async(image[tiles[0].window], stream)
        for i, tile in enumerate(tiles):
            x, copied = pending
            if i + 1 < len(tiles):
                pending = self._upload_async(image[tiles[i + 1].window], stream)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            x.record_stream(current)  # allocated on the side stream, used on this one
            yield tile, x.permute(2, 0, 1).unsqueeze(0)

    def _upload_async(self, window: FloatImage, stream: torch.cuda.Stream) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Start copying ``window`` (HWC) to the device on ``stream``; the event marks its arrival."""
        pinned = torch.empty(window.shape, dtype=torch.float32, pin_memory=True)
        np.copyto(pinned.numpy(), window)
        with torch.cuda.stream(stream):
            x = pinned.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copied.record(stream)
        return x, copied

    def _run_window(self, x: torch.Tensor, *, quantize: bool) -> np.ndarray:
        """Run one window (1 x 3 x H x W on the device) and return its output on the host: unclamped
        float32 HWC, or uint8 HWC quantised on the device when ``quantize``."""
        h, w = x.shape[2], x.shape[3]
        exact = self._exact if not self._cpu_methods else is_exact(self.cpu_choice(h, w).method)
        y = self._infer(x, exact=exact)
        if not exact:
            problem = self._suspicious(x, y)
            if problem is not None:
                self._log_fallback(problem)
                y = self._infer(x, exact=True)
        if not bool(torch.isfinite(y).all()):
            raise InferenceError("the network produced non-finite values in full precision")
        expected = (1, 3, h * self.scale, w * self.scale)
        if tuple(y.shape) != expected:
            raise InferenceError(f"the network returned shape {tuple(y.shape)} for a {h}x{w} tile, expected {expected}")
        if quantize:
            # floor(clamp(y) * 255 + 0.5) in float32, as the host encoders round: the same k for every pixel.
            y = (y.clamp(0.0, 1.0) * 255.0 + 0.5).clamp_(0.0, 255.0).to(torch.uint8)
        # channels_last output makes this permute a contiguous HWC view.
        out: np.ndarray = y[0].permute(1, 2, 0).cpu().numpy()
        return out

    def _infer(self, x: torch.Tensor, *, exact: bool) -> torch.Tensor:
        """:meth:`_forward`, through the batcher when there is one (same network, precision and shape)."""
        batcher = self.batcher
        if batcher is None:
            return self._forward(x, exact=exact)
        try:
            return batcher.run((id(self), exact, tuple(x.shape)), x, lambda b: self._forward(b, exact=exact))
        except BatcherTimeoutError as exc:
            raise InferenceError(f"inference timed out: {exc}") from exc
        except BatcherClosedError as exc:
            raise InferenceError("inference was stopped: the server is shutting down") from exc

    def _forward(self, x: torch.Tensor, *, exact: bool) -> torch.Tensor:
        """One network pass; float32 result on the device. Maps failures to the engine's errors."""
        try:
            with torch.inference_mode():
                if self._cpu_methods:
                    runner = self._cpu_runner(self._cpu_method(x, exact=exact))
                    y = self._call(runner, x) if isinstance(runner, nn.Module) else runner(x)
                elif exact:
                    y = self._call(self._exact_module(), x)
                else:
                    y = self._call(self._module, x.to(self.dtype))
                result: torch.Tensor = y.float()
                return result
        except InferenceError:
            raise
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise _OutOfMemoryError(str(exc)) from exc
            logger.exception("network %s failed on a %s tile", self.arch.name, tuple(x.shape))
            raise InferenceError(
                f"the {self.arch.name} network failed on a {x.shape[2]}x{x.shape[3]} tile: {exc}"
            ) from exc

    def _call(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)``, compiled when asked for; a compiled call that fails (other than out of
        memory) turns compilation off for this upscaler and is redone eagerly. On the device pipeline
        only the shapes :meth:`warm_up` compiled use it (no compiling on a serving thread), and never
        a masked call (compiled code would skip its hooks)."""
        compiled = self._compiled_for(module)
        if compiled is not None and self._device_pipeline:
            eager = getattr(self._eager_only, "on", False)
            if eager or tuple(x.shape) not in self._compiled_shapes:
                compiled = None
        if compiled is not None:
            try:
                return compiled(x)
            except Exception as exc:
                if _is_out_of_memory(exc):
                    raise
                with self._lock:
                    first = not self._compile_failed
                    self._compile_failed = True
                    self._compiled.clear()
                if first:
                    logger.warning(
                        "torch.compile of %s failed (%s: %s); running it eagerly",
                        self.arch.name,
                        type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "",
                    )
        out: torch.Tensor = module(x)
        return out

    def _compiled_for(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The compiled wrapper of ``module`` (made on first need; compilation itself happens on its
        first call), or None when compilation is off or has failed."""
        if not self.compile_module or self._compile_failed:
            return None
        found = self._compiled.get(id(module))
        if found is not None:
            return found
        with self._lock:
            if self._compile_failed:
                return None
            found = self._compiled.get(id(module))
            if found is None:
                try:
                    found = torch.compile(module)
                except Exception as exc:  # e.g. an unsupported platform: refused before any call
                    self._compile_failed = True
                    logger.warning("torch.compile is unavailable (%s); running %s eagerly", exc, self.arch.name)
                    return None
                self._compiled[id(module)] = found
            return found

    def _resolve_cpu_methods(
        self, explicit: Sequence[CpuMethod] | None, dtype: torch.dtype, convolution: str
    ) -> tuple[CpuMethod, ...]:
        """The CPU candidates: ``explicit``, or what ``dtype`` and ``convolution`` imply. The Winograd
        form is built now, so a machine without its kernel fails here, not on the first request."""
        if explicit is not None:
            found = tuple(explicit)
        else:
            precision = "bf16" if dtype == torch.bfloat16 else "fp32"
            found = methods.candidates(precision, convolution, winograd_ok=True, native_bf16=False)
        if not found:
            raise ValueError("no CPU method to run the network with")
        if "winograd" in found:
            try:
                self._cpu_runner("winograd")
            except ValueError:
                if found == ("winograd",) or convolution == "winograd":
                    raise
                found = tuple(m for m in found if m != "winograd")
        return found

    def _cpu_method(self, x: torch.Tensor, *, exact: bool) -> CpuMethod:
        """The method for this window: the measured choice, or its fastest exact method when ``exact``
        is asked for (the redo of a suspicious bf16 window)."""
        choice = self.cpu_choice(x.shape[2], x.shape[3])
        if not exact or is_exact(choice.method):
            return choice.method
        found = fastest_exact(self._cpu_methods, choice)
        if found is None and self._device_pipeline:
            found = "direct"  # the device pipeline's masks hook module convolutions
        if found is None:  # bf16 forced: the redo takes Winograd where it can be had
            try:
                self._cpu_runner("winograd")
                found = "winograd"
            except ValueError:
                found = "direct"
        return found

    def _cpu_runner(self, method: CpuMethod) -> Runner:
        """The runner for ``method``, built on first need (the bf16 copy costs half the weights again)."""
        found = self._runners.get(method)
        if found is not None:
            return found
        with self._lock:
            found = self._runners.get(method)
            if found is None:
                found = methods.build(method, self.arch, self._module)
                self._runners[method] = found
            return found

    def _probe(self, method: CpuMethod, side: int) -> float:
        """Seconds for one pass of ``method`` over a ``side`` x ``side`` window (rounded up to the grid)."""
        side = -(-side // self.multiple) * self.multiple
        generator = torch.Generator().manual_seed(side)
        x = torch.rand(1, 3, side, side, generator=generator).contiguous(memory_format=torch.channels_last)
        runner = self._cpu_runner(method)
        with torch.inference_mode():
            return probe_seconds(lambda: runner(x))

    def _exact_module(self) -> nn.Module:
        """The fp32 module on the device, copied from the host master on first need (under the lock)."""
        module = self._fp32_module
        if module is not None:
            return module
        if self.device.type == "cpu":
            return self._module
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
                "%s %s produced %s; redoing such tiles in fp32 (logged once)", self.arch.name, self.dtype, problem
            )

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ device pipeline

    def warm_up(self) -> list[tuple[int, int]]:
        """Run every bucket shape once (batch 1 and the batcher's ``max_batch``) that fits free memory,
        so cudnn's benchmark (turned on here for CUDA) and ``torch.compile`` (when enabled) pay their
        per-shape cost at start-up, not on a request's first window. Returns the (batch, side) pairs
        run; a shape that does not fit ends the sweep. Nothing to do off the device pipeline."""
        if not self._device_pipeline:
            return []
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        if self.compile_module:
            config = importlib.import_module("torch._dynamo").config  # loaded only with compile on
            limit = 2 * len(self._buckets) + 8
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(config, name):
                    setattr(config, name, max(limit, getattr(config, name)))
        per_pixel = bytes_per_input_pixel(self.arch, self.scale, self.dtype)
        budget = free_memory_bytes(self.device) * MEMORY_FRACTION[self.device.type]
        done: list[tuple[int, int]] = []
        for side in self._buckets:
            for batch in sorted({1, self._max_batch}):
                if not batch_fits(side, per_pixel, batch, budget):
                    return done
                x = torch.rand((batch, 3, side, side), device=self.device).contiguous(memory_format=torch.channels_last)
                shape = tuple(x.shape)
                self._compiled_shapes.add(shape)
                try:
                    self._forward(x, exact=self._exact)
                except (_OutOfMemoryError, InferenceError) as exc:
                    self._compiled_shapes.discard(shape)
                    logger.warning(
                        "warm-up of %s stopped at %dx%d windows x%d: %s", self.arch.name, side, side, batch, exc
                    )
                    self._release_memory()
                    return done
                done.append((batch, side))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return done

    def _bucket_for(self, height: int, width: int) -> int:
        """The window side for a ``height`` x ``width`` (padded) image: from the free memory budget
        for a whole batch (:func:`~.buckets.choose_bucket`), or around an explicit ``tile_size``."""
        whole = max(height, width)
        if self.tile_size:
            context = -(-self.tile_overlap // self.multiple) * self.multiple
            want = min(whole, self.tile_size + 2 * context)
            candidates = (
                self._buckets if want == whole else tiling_buckets(self._buckets, self.tile_overlap, self.multiple)
            )
            fits = [s for s in candidates if s >= want]
            return min(fits) if fits else max(candidates)
        return choose_bucket(
            height,
            width,
            overlap=self.tile_overlap,
            buckets=self._buckets,
            bytes_per_pixel=bytes_per_input_pixel(self.arch, self.scale, self.dtype),
            max_batch=self._max_batch,
            budget=free_memory_bytes(self.device) * MEMORY_FRACTION[self.device.type],
            multiple=self.multiple,
        )

    def _upscale_on_device(
        self, image: FloatImage, out_size: tuple[int, int], progress: Progress | None, quantize: bool
    ) -> FloatImage:
        """:meth:`upscale` with everything after the upload on the device: windows in bucket shapes,
        feathered blending into a device canvas at the target scale, the Lanczos resize, clamping and
        8-bit quantisation; one copy back of the final output through a reused staging buffer."""
        height, width = image.shape[:2]
        out_w, out_h = out_size
        padded = self._pad_to_multiple(image)
        target = self._window_target(image, padded, out_size)
        canvas = self._shrinking_on_oom(
            lambda side: self._run_on_device(padded, side, progress, target),
            self._bucket_for(*padded.shape[:2]),
            lambda side: smaller_bucket(side, self._buckets, self.tile_overlap, self.multiple),
            "windows",
        )
        with torch.inference_mode():
            out = canvas[:, : height * target, : width * target].clamp_(0.0, 1.0)
            if (out.shape[2], out.shape[1]) != (out_w, out_h):
                out = device_ops.lanczos_resize(out, out_w, out_h)
            return self._download(out, quantize=quantize)

    def _run_on_device(self, image: FloatImage, side: int, progress: Progress | None, target: int) -> torch.Tensor:
        """The 3 x H*target x W*target canvas on the device, every window blended in."""
        height, width = image.shape[:2]
        whole = max(height, width) <= side
        tile = max(height, width) if whole else bucket_tile(side, self.tile_overlap, self.multiple)
        plan = plan_tiles(height, width, tile, self.tile_overlap, self.multiple)
        total = len(plan)
        feather = min(self.feather, max_feather(plan))
        margin = self._resize_margin(target)
        with torch.inference_mode():
            canvas = torch.zeros((3, height * target, width * target), dtype=torch.float32, device=self.device)
            for done, (spec, x) in enumerate(self._device_uploads(image, plan.tiles), start=1):
                y = self._device_window(x, side)
                blended = spec
                if target != self.scale:
                    blended = trim_tile(plan, spec, feather, margin)
                    r0 = (blended.rows.win_start - spec.rows.win_start) * self.scale
                    c0 = (blended.cols.win_start - spec.cols.win_start) * self.scale
                    part = y[
                        :, r0 : r0 + blended.rows.win_size * self.scale, c0 : c0 + blended.cols.win_size * self.scale
                    ]
                    y = device_ops.lanczos_resize(
                        part.clamp(0.0, 1.0), blended.cols.win_size * target, blended.rows.win_size * target
                    )
                device_ops.blend_into(canvas, y, plan, blended, scale=target, feather=feather)
                del y
                if progress is not None:
                    progress(done, total)
        return canvas

    def _device_window(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """One window's native output (3 x h*scale x w*scale float32 on the device), checked with a
        single host sync; a suspicious reduced-precision result is redone in fp32 (:meth:`_fp32_redo`)."""
        y = self._device_pass(x, side, exact=self._exact)
        finite, y_max, x_max = torch.stack([torch.isfinite(y).all().float(), y.amax(), x.amax()]).tolist()
        if not self._exact:
            problem = None
            if not finite:
                problem = "NaN/Inf values"
            elif y_max < _BLACK_OUTPUT and x_max > _VISIBLE_INPUT:
                problem = "an all-black tile from a visible input"
            if problem is not None:
                self._log_fallback(problem)
                y = self._fp32_redo(x, side)
                finite = bool(torch.isfinite(y).all())
        if not finite:
            raise InferenceError("the network produced non-finite values in full precision")
        return y

    def _fp32_redo(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """``x``'s window in fp32, split into sub-windows of at most half its pixels (with full context,
        feather-blended on the device) so twice the bytes per pixel fit where the window did."""
        h, w = x.shape[2], x.shape[3]
        sub = fp32_split_side(side, self.tile_overlap, self.multiple)
        if sub is None or max(h, w) <= sub:
            return self._device_pass(x, side, exact=True)
        plan = plan_tiles(h, w, bucket_tile(sub, self.tile_overlap, self.multiple), self.tile_overlap, self.multiple)
        feather = min(self.feather, max_feather(plan))
        out = torch.zeros((3, h * self.scale, w * self.scale), dtype=torch.float32, device=x.device)
        for spec in plan.tiles:
            rows, cols = spec.window
            part = self._device_pass(x[:, :, rows, cols], sub, exact=True)
            device_ops.blend_into(out, part, plan, spec, scale=self.scale, feather=feather)
        return out

    def _device_pass(self, x: torch.Tensor, side: int, *, exact: bool) -> torch.Tensor:
        """``x`` (1 x 3 x h x w) run as a ``side`` x ``side`` window (masked zero padding when smaller,
        :func:`device_ops.masked_call`), through the batcher when there is one; 3 x h*scale x w*scale."""
        h, w = x.shape[2], x.shape[3]
        padded = (h, w) != (side, side) and device_ops.maskable(self._pass_module(x, exact=exact))
        if padded:
            item = device_ops.with_mask(x, h, w, side)
            key: tuple[object, ...] = (id(self), exact, "masked", side)

            def forward(batch: torch.Tensor) -> torch.Tensor:
                return self._forward_masked(batch, exact=exact)
        else:
            item, key = x, (id(self), exact, tuple(x.shape))

            def forward(batch: torch.Tensor) -> torch.Tensor:
                return self._forward(batch, exact=exact)

        if self.batcher is None:
            y = forward(item)
        else:
            try:
                y = self.batcher.run(key, item, forward)
            except BatcherTimeoutError as exc:
                raise InferenceError(f"inference timed out: {exc}") from exc
            except BatcherClosedError as exc:
                raise InferenceError("inference was stopped: the server is shutting down") from exc
        run_h, run_w = (side, side) if padded else (h, w)
        expected = (1, 3, run_h * self.scale, run_w * self.scale)
        if tuple(y.shape) != expected:
            raise InferenceError(
                f"the network returned shape {tuple(y.shape)} for a {run_h}x{run_w} tile, expected {expected}"
            )
        return y[0, :, : h * self.scale, : w * self.scale]

    def _pass_module(self, x: torch.Tensor, *, exact: bool) -> nn.Module:
        """The module a pass over ``x`` runs: on the CPU its method's runner, on CUDA the device copy."""
        if self._cpu_methods:
            runner = self._cpu_runner(self._cpu_method(x, exact=exact))
            assert isinstance(runner, nn.Module)  # the device pipeline's CPU methods are modules
            return runner
        return self._exact_module() if exact else self._module

    def _forward_masked(self, batch: torch.Tensor, *, exact: bool) -> torch.Tensor:
        """:meth:`_forward` of a masked batch, eagerly (compiled code would skip the mask hooks)."""
        module = self._pass_module(batch, exact=exact)
        self._eager_only.on = True
        try:
            return device_ops.masked_call(module, batch, lambda images: self._forward(images, exact=exact))
        finally:
            self._eager_only.on = False

    def _device_uploads(self, image: FloatImage, tiles: Sequence[Tile]) -> Iterator[tuple[Tile, torch.Tensor]]:
        """Each tile with its window (1 x 3 x h x w) on the device. On CUDA windows go through two
        staging buffers from the upscaler's pool (pinned, reused across windows and calls) on a side
        stream, the next window's copy overlapping the current window's compute."""
        if self.device.type != "cuda":
            for tile in tiles:
                yield tile, torch.from_numpy(np.ascontiguousarray(image[tile.window])).permute(2, 0, 1).unsqueeze(0)
            return
        nbytes = max(t.rows.win_size * t.cols.win_size for t in tiles) * 3 * 4
        slots = [self._staging.acquire(nbytes), self._staging.acquire(nbytes)]
        events: list[torch.cuda.Event | None] = [None, None]
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

        def start(i: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            slot = i % 2
            previous = events[slot]
            if previous is not None:
                previous.synchronize()  # the copy of two windows ago: long done
            window = image[tiles[i].window]
            staged = device_ops.view_as(slots[slot], window.shape, torch.float32)
            np.copyto(staged.numpy(), window)
            with torch.cuda.stream(stream):
                x = staged.to(self.device, non_blocking=True)
                copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
                copied.record(stream)
            events[slot] = copied
            return x, copied

        try:
            pending = start(0)
            for i, tile in enumerate(tiles):
                x, copied = pending
                if i + 1 < len(tiles):
                    pending = start(i + 1)
                current = torch.cuda.current_stream(self.device)
                current.wait_event(copied)
                x.record_stream(current)
                yield tile, x.permute(2, 0, 1).unsqueeze(0)
        finally:
            for event in events:
                if event is not None:
                    event.synchronize()
            for buffer in slots:
                self._staging.release(buffer)

    def _download(self, out: torch.Tensor, *, quantize: bool) -> FloatImage:
        """The final C x H x W output as a host H x W x C float32 array; quantised to uint8 on the
        device first when ``quantize`` (a quarter of the bytes to copy), returned as ``k / 255``."""
        hwc = (device_ops.quantize_8bit(out) if quantize else out).permute(1, 2, 0).contiguous()
        if self.device.type == "cuda":
            buffer = self._staging.acquire(hwc.numel() * hwc.element_size())
            try:
                staged = device_ops.view_as(buffer, tuple(hwc.shape), hwc.dtype)
                staged.copy_(hwc, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
                host = staged.numpy().copy()
            finally:
                self._staging.release(buffer)
        else:
            host = hwc.numpy().copy()
        if quantize:
            floats: FloatImage = np.multiply(host, np.float32(1.0 / 255.0), dtype=np.float32)
            return floats
        return np.ascontiguousarray(host, dtype=np.float32)

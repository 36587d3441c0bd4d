"""Device, precision, thread and memory decisions, made once at start-up from the settings.

Every rule that depends on the hardware lives here so the engine only ever sees a concrete
``torch.device`` and ``torch.dtype``; a bad combination fails at start-up with a message that says
what to change, not on the first request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from upscale_server.vocabulary import usable_cores

logger = logging.getLogger(__name__)

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# glibc mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# mallopt takes a C int, so thresholds meant to be larger than 2 GiB (a 4 GiB mmap threshold and a
# 16 GiB trim threshold, as one would set through the MALLOC_*_ environment variables) are capped at
# INT_MAX; glibc 2.36 accepts these values (mallopt returns 1) and they have the same effect on tensors
# below 2 GiB.
_INT_MAX = 2**31 - 1
_ALLOCATOR_SETTINGS = ((_M_MMAP_THRESHOLD, _INT_MAX), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, 1 << 30))

_allocator_lock = threading.Lock()
_allocator_tuned: bool | None = None


def resolve_device(setting: str) -> torch.device:
    """Turn the ``device`` setting (auto, cpu, cuda, cuda:N) into a device that exists here.

    ``auto`` picks CUDA when a GPU is usable, else the CPU. Asking for CUDA on a machine without it
    is an error rather than a silent CPU fallback: the CPU is 50-100x slower and the operator should know.
    """
    value = setting.strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {setting!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"unsupported device {setting!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {setting!r} requested but CUDA is not available (CPU-only torch build or no GPU); "
            "use device=cpu or auto"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {setting!r} requested but only {count} CUDA device(s) exist")
    return device


def bind_thread(device: torch.device) -> None:
    """Make ``device`` the current CUDA device of the calling thread (a no-op elsewhere).

    The current device is per thread and starts as cuda:0: a worker or batcher thread that skipped
    this would allocate its temporaries and streams on the wrong GPU with ``cuda:1``."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Turn the ``precision`` setting (auto, fp32, fp16, bf16) into the compute dtype for ``device``.

    ``auto`` is fp16 on CUDA (tensor cores; black/NaN tiles fall back to fp32 in the engine) and fp32
    on the CPU (exact). fp16 on the CPU is refused: older PyTorch builds have no half conv2d kernel
    there (``"slow_conv2d_cpu" not implemented for 'Half'``, Real-ESRGAN's FAQ); torch 2.13 runs it
    through oneDNN, but no speed gain over bf16 was measured and this engine's fp16 path (half module
    copy, NaN fallback) is built and tested for CUDA. bf16 works on both; on the CPU it is the fast
    mode (about 2x on AVX-512-bf16 cores) at a cost of a few 8-bit levels.
    """
    value = precision.strip().lower()
    if value == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if value not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    if value == "fp16" and device.type == "cpu":
        raise ValueError(
            "precision fp16 is for CUDA only (half-precision conv2d on the CPU is missing or slow depending "
            "on the PyTorch build); use fp32 (exact) or bf16 (the CPU fast mode)"
        )
    if value == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        logger.warning(
            "bf16 requested on a CPU without native bf16 support (no AVX512-BF16/AMX visible to oneDNN): "
            "expect it to be several times slower than fp32, not faster"
        )
    return _PRECISIONS[value]


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN sees native bf16 instructions (AVX512-BF16 or AMX) on this CPU.

    Why it matters: without them bf16 convs are emulated. Measured on a 2-core EPYC VM whose flags
    hide AVX-512: a 64-channel conv stack ran about 9x slower in bf16 than in fp32 with channels_last,
    and about 400x slower without channels_last, while bf16 ran about 2x faster than fp32 on a Zen 5
    host that exposes AVX512-BF16.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def configure_threads(n: int) -> int:
    """Set the intra-op thread count for CPU inference; 0 means every core we may run on.

    Returns the count set.
    """
    if n < 0:
        raise ValueError(f"threads must be >= 0, got {n}")
    if n == 0:
        n = usable_cores()
    torch.set_num_threads(n)
    return n


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_memory_bytes(device: torch.device) -> int:
    """Memory that a new allocation on ``device`` can use now, in bytes.

    CUDA: free bytes from the driver (``torch.cuda.mem_get_info``) plus what PyTorch's caching
    allocator holds but does not use (it will reuse that first). CPU: ``MemAvailable`` from
    /proc/meminfo (counts reclaimable page cache, unlike MemFree), falling back to free physical pages,
    plus what this process's malloc holds free: :func:`tune_cpu_allocator` keeps freed buffers in the
    process, so after one big image they are resident and missing from MemAvailable, yet the next
    image reuses them first (without this, every later image got smaller tiles than the first).
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    available = _meminfo_available()
    if available is None:
        try:
            available = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 1 << 30  # unknown platform: assume 1 GiB so the engine still picks a bounded tile
    return available + _malloc_free_bytes()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


@functools.cache
def _libc_function(name: str) -> Any:
    """``name`` from the C library, looked up once (``find_library`` runs a subprocess), or None."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def _malloc_free_bytes() -> int:
    """Free bytes inside glibc malloc's heap (``mallinfo2().fordblks``); 0 where there is no glibc 2.33+."""
    mallinfo2 = _libc_function("mallinfo2")
    if mallinfo2 is None:
        return 0
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def tune_cpu_allocator() -> bool:
    """Stop glibc malloc from handing big buffers back to the OS between layers; idempotent.

    Why: PyTorch's CPU allocator is plain malloc. By default glibc serves large blocks with mmap and
    unmaps them on free, and trims the heap top when it frees; every layer's activation (tens of MB
    for an RRDB tile) is then freshly mapped, page-faulted and zeroed by the kernel on each use.
    Measured on this project's CPU box, that made x4plus fp32 timings jump to about 2x (256² input:
    12.8 s vs 6.9 s) and vary from run to run; an alloc/free loop of 64 MB + 16 MB buffers ran 8.6 s
    by default and 1.5 s after this call. The settings (M_MMAP_THRESHOLD and M_TRIM_THRESHOLD at
    2 GiB, M_TOP_PAD 1 GiB) keep freed memory in the process for reuse. The cost: resident memory
    stays near its peak after a large image instead of shrinking.

    Returns True when the settings were applied (now or by an earlier call), False where there is no
    glibc ``mallopt`` (musl, macOS, Windows) or it refused a value; never raises.
    """
    global _allocator_tuned  # noqa: PLW0603 - process-wide allocator state is global by nature
    with _allocator_lock:
        if _allocator_tuned is not None:
            return _allocator_tuned
        _allocator_tuned = _apply_mallopt()
        return _allocator_tuned


def _apply_mallopt() -> bool:
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        logger.info("no glibc mallopt on this platform; CPU allocator left at its defaults")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = True
    for param, value in _ALLOCATOR_SETTINGS:
        if mallopt(param, value) != 1:
            logger.warning("mallopt(%d, %d) was refused; CPU timings may vary", param, value)
            ok = False
    if ok:
        logger.debug("glibc malloc tuned to keep freed memory (mmap/trim threshold 2 GiB, top pad 1 GiB)")
    return ok

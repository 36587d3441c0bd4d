"""What every benchmark report names: the CPU model and the instruction sets that decide compute paths."""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: The flags that change which kernels run (AVX2-only EPYC vs AVX-512/AMX Xeon).
FLAGS = ("sse4_2", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def describe() -> dict[str, object]:
    """CPU model, its relevant flags, core count and Python version, from /proc/cpuinfo where there is one."""
    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else ():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "flags") and key.strip() not in info:
            info[key.strip()] = value.strip()
    flags = set(info.get("flags", "").split())
    return {
        "model": info.get("model name") or platform.processor() or "unknown CPU",
        "flags": " ".join(flag for flag in FLAGS if flag in flags),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }

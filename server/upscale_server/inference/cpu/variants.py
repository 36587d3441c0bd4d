"""The Winograd kernel's build variants: their compiler flags and which one a CPU gets.

Standard library only, on purpose: the install-time build hook (``hatch_build.py``) loads this file by
path, before the package's dependencies (torch) can be assumed installed, so the hook and the loader
(:mod:`upscale_server.inference.cpu.kernel`) share one definition.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Where the built libraries live, inside the package (git-ignored; shipped in the wheel).
BUILT_DIR: Final = Path(__file__).with_name("_built")
SOURCE: Final = Path(__file__).with_name("winograd.c")

#: Compile flags of every variant. -fopenmp compiles the pragmas; the link step gets no -fopenmp, so
#: no OpenMP runtime is linked and the GOMP_* symbols bind to torch's at load time (kernel.py).
#: -fno-tree-loop-distribute-patterns keeps gcc from turning the short copy loops into memcpy calls.
COMPILE_FLAGS: Final = ("-O3", "-fno-tree-loop-distribute-patterns", "-fopenmp", "-fPIC", "-std=c11")
LINK_FLAGS: Final = ("-shared",)


@dataclass(frozen=True)
class Variant:
    """One build of the kernel: its ISA flags and the /proc/cpuinfo flags a CPU needs to run it."""

    name: str
    isa_flags: tuple[str, ...]
    cpu_flags: frozenset[str]
    x86_only: bool

    @property
    def filename(self) -> str:
        return f"winograd_{self.name}.so"


#: Best first. Not ``-march=native``: the flags, not the build machine's CPU, decide a variant, so a
#: wheel or image built on one machine serves any host with the same instruction sets. The AVX-512
#: build uses 16-channel blocks in the transforms (one zmm register) and a 6x32 GEMM kernel.
VARIANTS: Final = (
    Variant(
        "avx512",
        ("-mavx512f", "-mavx512vl", "-mavx2", "-mfma", "-DCB=16"),
        frozenset({"avx512f", "avx512vl", "avx2", "fma"}),
        x86_only=True,
    ),
    Variant("avx2", ("-mavx2", "-mfma"), frozenset({"avx2", "fma"}), x86_only=True),
    Variant("portable", (), frozenset(), x86_only=False),
)
BY_NAME: Final = {v.name: v for v in VARIANTS}


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def buildable(machine: str | None = None) -> tuple[Variant, ...]:
    """The variants a build on ``machine`` (default: this one) produces."""
    return tuple(v for v in VARIANTS if not v.x86_only or is_x86(machine))


def choose(cpu_flags: Iterable[str], machine: str | None = None, *, prefer_avx512: bool = True) -> Variant:
    """The best variant a CPU with ``cpu_flags`` (as /proc/cpuinfo lists them) can run.

    ``prefer_avx512=False`` skips the AVX-512 build where it measured no faster than AVX2 (see
    :data:`upscale_server.inference.cpu.kernel.PREFER_AVX512`).
    """
    flags = set(cpu_flags)
    for variant in buildable(machine):
        if variant.name == "avx512" and not prefer_avx512:
            continue
        if variant.cpu_flags <= flags:
            return variant
    return BY_NAME["portable"]

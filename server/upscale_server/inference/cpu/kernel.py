"""The Winograd C kernel (``winograd.c``): built when the package is installed, loaded with ctypes.

The install-time build hook (``hatch_build.py`` at the repository root) compiles one library per
variant (:mod:`upscale_server.inference.cpu.variants`) into ``_built/`` inside this package; the
server never runs a compiler. At load time the best variant this CPU can run is chosen from
/proc/cpuinfo. Where none was built (no C compiler at install time) or none can be loaded,
:func:`available` is False, :func:`unavailable_reason` says why in one line, and the engine keeps
oneDNN's direct convolutions.

OpenMP: the libraries are compiled with -fopenmp but link no OpenMP runtime. Before loading one, the
runtime torch has loaded (its bundled libgomp, or libiomp/libomp) is promoted to global symbol scope,
so the kernel's GOMP_* calls resolve to it: one thread pool for torch and the kernel, no second
runtime spinning against the first.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from upscale_server.inference.cpu import variants
from upscale_server.inference.cpu.variants import BUILT_DIR, Variant

log = logging.getLogger(__name__)

SOURCE: Final = variants.SOURCE
#: What gets the kernel built: reinstalling the package runs the build hook.
REINSTALL: Final = "with a C compiler (gcc) present, reinstall: pip install -e . (or pip install .)"
#: Whether AVX-512 CPUs get the AVX-512 variant by default; measured faster than AVX2 (see
#: docs/benchmarks.md), otherwise they would get the AVX2 one.
PREFER_AVX512: Final = True

#: The kernel's status codes (winograd.c).
WINO_OK: Final = 0
WINO_DECLINED: Final = 1
WINO_ENOMEM: Final = -1

_OPENMP_RUNTIME: Final = re.compile(r"/lib(gomp|iomp5|omp)[^/]*\.so[^/]*$")


@dataclass
class _KernelState:
    """The process's kernel in use, the libraries loaded so far, or why there is none (remembered)."""

    lib: ctypes.CDLL | None = None
    variant: Variant | None = None
    reason: str = ""  # why this variant was chosen
    loaded: dict[str, ctypes.CDLL] = field(default_factory=dict)
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_kernel = _KernelState()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choose_variant(flags: Iterable[str], machine: str | None = None) -> Variant:
    """The variant a CPU with ``flags`` gets: a pure function of the flags (and the architecture)."""
    return variants.choose(flags, machine, prefer_avx512=PREFER_AVX512)


def library_path(variant: Variant) -> Path:
    return BUILT_DIR / variant.filename


def openmp_runtimes(maps: str | None = None) -> list[str]:
    """The OpenMP runtime files mapped into this process (``maps``: /proc/self/maps' text)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    found: list[str] = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and _OPENMP_RUNTIME.search(parts[5]) and parts[5] not in found:
            found.append(parts[5])
    return found


def _share_torchs_openmp() -> None:
    """Promote the OpenMP runtime torch loaded to global scope, for the kernel's GOMP_* symbols.

    torch loads its runtime with RTLD_LOCAL; RTLD_NOLOAD re-opens that same copy (never a second one)
    and RTLD_GLOBAL makes its symbols visible to libraries loaded afterwards.
    """
    import torch  # noqa: F401 - loads torch's OpenMP runtime

    runtimes = openmp_runtimes()
    if not runtimes:
        raise OSError(
            "torch has no OpenMP runtime loaded (libgomp/libiomp) for the kernel to share (torch built without OpenMP?)"
        )
    ctypes.CDLL(runtimes[0], mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernel's C signatures (ctypes would guess them wrong); every entry returns a status."""
    f32p, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.wino_input.argtypes = [f32p, i32, i32, i32, i32, i32, i32, f32p, i32, i32, i32]
    lib.wino_input.restype = i32
    lib.wino_output.argtypes = [
        *(f32p, i32, i32, i32, i32, i32, i32),
        *(f32p, i32, f32, f32p, f32),
        *(f32p, i32, i32),
        *(f32p, i32, i32, i32),
    ]
    lib.wino_output.restype = i32
    lib.wino_gemm.argtypes = [f32p, i32, f32p, i32, i32, f32p, i32, ctypes.c_int64, i32]
    lib.wino_gemm.restype = i32
    lib.wino_set_alloc_budget.argtypes = [ctypes.c_long]
    lib.wino_set_alloc_budget.restype = None
    return lib


def check(status: int, function: str) -> int:
    """``status`` unless it is an error: MemoryError (which the engine answers with smaller tiles)."""
    if status == WINO_ENOMEM:
        raise MemoryError(f"the Winograd kernel ran out of memory ({function}: an allocation failed)")
    if status not in (WINO_OK, WINO_DECLINED):
        raise RuntimeError(f"the Winograd kernel's {function} returned an unknown status {status}")
    return status


def _open(variant: Variant) -> ctypes.CDLL:
    lib = _kernel.loaded.get(variant.name)
    if lib is None:
        path = library_path(variant)
        if not path.is_file():
            raise OSError(f"the Winograd kernel's {variant.name} variant was not built at install time; {REINSTALL}")
        _share_torchs_openmp()
        lib = _kernel.loaded[variant.name] = _bind(ctypes.CDLL(str(path)))
    return lib


def _default() -> tuple[Variant, str]:
    """This CPU's variant and why; a better one that was not built falls back to the next."""
    flags = cpu_flags()
    best = choose_variant(flags)
    why = f"CPU flags {' + '.join(sorted(best.cpu_flags))}" if best.cpu_flags else "no AVX2+FMA on this CPU"
    if not PREFER_AVX512 and "avx512f" in flags:
        why += " (AVX-512 measured no faster)"
    for variant in variants.VARIANTS[variants.VARIANTS.index(best) :]:
        if library_path(variant).is_file():
            if variant != best:
                why += f"; the {best.name} variant was not built, using {variant.name}"
            return variant, why
    return best, why


def load(variant: str | None = None) -> ctypes.CDLL:
    """The kernel in use, loaded once per process; OSError (with a one-line reason) when there is none.

    ``variant`` (``"avx512"``, ``"avx2"``, ``"portable"``) loads that build instead of this CPU's
    choice and makes it the one in use from now on: benchmarks and tests compare variants this way,
    without settings. A failure of the default choice is remembered and not retried.
    """
    lib = _kernel.lib  # every transform calls this: no lock once loaded
    if lib is not None and variant is None:
        return lib
    with _kernel.lock:
        if variant is not None:
            chosen = variants.BY_NAME.get(variant)
            if chosen is None:
                raise ValueError(f"unknown kernel variant {variant!r}; one of {', '.join(variants.BY_NAME)}")
            loaded = _open(chosen)  # an OSError here leaves the kernel in use as it was
            _kernel.lib, _kernel.variant, _kernel.reason = loaded, chosen, "asked for"
            return loaded
        if _kernel.lib is not None:
            return _kernel.lib
        if _kernel.error is not None:
            raise OSError(_kernel.error)
        chosen, why = _default()
        try:
            loaded = _open(chosen)
        except OSError as exc:
            _kernel.error = str(exc)
            raise OSError(_kernel.error) from exc
        _kernel.lib, _kernel.variant, _kernel.reason = loaded, chosen, why
        return loaded


def build_id() -> str:
    """Which build of the kernel this process uses: its variant and a digest of the library (part of
    the CPU method cache's key, so a rebuilt kernel is measured again); "none" without a kernel."""
    if not available() or _kernel.variant is None:
        return "none"
    digest = hashlib.sha256(library_path(_kernel.variant).read_bytes()).hexdigest()[:12]
    return f"{_kernel.variant.name}-{digest}"


def available() -> bool:
    """True when the kernel is built and loads on this machine."""
    try:
        load()
    except OSError as exc:
        log.info("Winograd kernel unavailable (%s); using direct convolutions", exc)
        return False
    return True


def unavailable_reason() -> str | None:
    """None where the kernel loads, else why not, in one line."""
    try:
        load()
    except OSError as exc:
        return str(exc)
    return None


def variant() -> str | None:
    """The name of the variant in use (loading this CPU's choice first); None when there is none."""
    return _kernel.variant.name if available() and _kernel.variant is not None else None


def main() -> int:
    """``python -m upscale_server.inference.cpu``: which variant is loaded and why, or why none is."""
    try:
        load()
    except OSError as exc:
        print(f"Winograd kernel: unavailable: {exc}", file=sys.stderr)  # noqa: T201 - a command's one line
        return 1
    assert _kernel.variant is not None
    print(f"Winograd kernel: {_kernel.variant.name} ({_kernel.reason}): {library_path(_kernel.variant)}")  # noqa: T201
    return 0

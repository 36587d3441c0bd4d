"""The Winograd C kernel (``winograd.c``): built once into a per-user cache, loaded with ctypes.

Build it ahead of time with::

    python -m upscale_server.inference.cpu

The CPU container image runs that at build time, and the test suite requires it (tests only load the
kernel, they never compile it). A server that finds no prebuilt kernel builds it on first use with
the system C compiler (``cc``, OpenMP); without one, :func:`available` is False and the engine keeps
oneDNN's direct convolutions.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import platformdirs

log = logging.getLogger(__name__)

SOURCE: Final = Path(__file__).with_name("winograd.c")
_CFLAGS: Final = ("-O3", "-fno-tree-loop-distribute-patterns", "-fopenmp", "-fPIC", "-shared", "-std=c11")
#: The command that builds the kernel ahead of time.
BUILD_COMMAND: Final = "python -m upscale_server.inference.cpu"


@dataclass
class _KernelState:
    """The process's one loaded kernel, or why there is none (remembered: a build is tried once)."""

    lib: ctypes.CDLL | None = None
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_kernel = _KernelState()


def _cache_dir() -> Path:
    """The per-user cache (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux), as for the weights' data folder."""
    return platformdirs.user_cache_path("upscale-server", appauthor=False) / "kernels"


def _isa_flags() -> tuple[str, ...]:
    """AVX2+FMA code where the CPU has it (every x86-64 server since 2013), portable code elsewhere.

    Not ``-march=native``: the flags, not the exact CPU, decide the build, so a kernel built into a
    container image at build time is reused on any host with the same instruction sets.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    try:
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    except OSError:
        return ()
    return ("-mavx2", "-mfma") if {"avx2", "fma"} <= set(flags) else ()


def shared_object_path() -> Path:
    """Where this machine's build of the kernel lives: the cache, under a key of the source and flags."""
    flags = " ".join((*_CFLAGS, *_isa_flags()))
    key = hashlib.sha256(SOURCE.read_bytes() + flags.encode()).hexdigest()
    return _cache_dir() / f"winograd-{platform.machine()}-{key[:16]}.so"


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *_CFLAGS, *_isa_flags(), str(SOURCE), "-o", str(built)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        built.replace(target)  # atomic: a concurrent process sees the old file or the whole new one


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernel's C signatures (ctypes would guess them wrong)."""
    f32p, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.wino_input.argtypes = [f32p, i32, i32, i32, i32, i32, i32, f32p, i32, i32, i32]
    lib.wino_input.restype = None
    lib.wino_output.argtypes = [
        *(f32p, i32, i32, i32, i32, i32, i32),
        *(f32p, i32, f32, f32p, f32),
        *(f32p, i32, i32),
        *(f32p, i32, i32, i32),
    ]
    lib.wino_output.restype = None
    lib.wino_gemm.argtypes = [f32p, i32, f32p, i32, i32, f32p, i32, ctypes.c_int64, i32]
    lib.wino_gemm.restype = i32
    return lib


def load(*, build: bool = True) -> ctypes.CDLL:
    """The kernel, loaded once per process; OSError when it cannot be had.

    ``build=False`` only loads a prebuilt kernel (see the module docstring) and never compiles; with
    ``build=True`` a missing one is compiled first. A failed build is remembered and not retried.
    """
    lib = _kernel.lib  # every transform calls this: no lock once loaded
    if lib is not None:
        return lib
    with _kernel.lock:
        if _kernel.lib is not None:
            return _kernel.lib
        if _kernel.error is not None:
            raise OSError(_kernel.error)
        target = shared_object_path()
        if not build and not target.exists():
            raise OSError(f"the Winograd kernel is not built for this machine ({target}): run `{BUILD_COMMAND}`")
        try:
            if not target.exists():
                _compile(target)
            loaded = _bind(ctypes.CDLL(str(target)))
        except (OSError, subprocess.SubprocessError) as exc:
            _kernel.error = str(exc)
            raise OSError(_kernel.error) from exc
        _kernel.lib = loaded
        return loaded


def build_id() -> str:
    """Which build of the kernel this process uses (part of the CPU method cache's key)."""
    return shared_object_path().stem


def available() -> bool:
    """True when the kernel is (or can be) compiled and loaded on this machine."""
    try:
        load()
    except OSError as exc:
        log.info("Winograd kernel unavailable (%s); using direct convolutions", exc)
        return False
    return True


def main() -> int:
    """``python -m upscale_server.inference.cpu``: build the kernel (if not built yet) and load it."""
    try:
        load()
    except OSError as exc:
        print(f"Winograd kernel: {exc}", file=sys.stderr)  # noqa: T201 - a command's one line of output
        return 1
    print(shared_object_path())  # noqa: T201
    return 0

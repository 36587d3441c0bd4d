"""Choosing the CPU method by measurement, once per machine, and remembering the choice.

The fastest way to run a network on a CPU is not a constant: on two 2-core machines of one cloud
kind, x4plus in exact fp32 ran fastest with Winograd at 128² on both, but at 256² Winograd won on an
AVX2-only EPYC (10.4 s vs 15.4 s direct) and lost on an AVX-512 Xeon (14.8 s vs 11.1 s); bf16 is
several times faster than fp32 with AMX, slower without it. So each candidate method
(:mod:`upscale_server.inference.cpu.methods`) is timed on a probe window of each *shape class*, and
the fastest kept.

The result is cached in a JSON file keyed by everything that changes it: the CPU model and its
relevant instruction sets, the torch version, the Winograd kernel build, the thread count, the
architecture and its parameters. Another machine, an upgraded torch or a new thread count measures
again; the same machine never does. Measuring x4plus costs 30-50 s on two cores, once per machine,
when the model is loaded (for the default model: at start-up, before the server reports ready).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import torch

from upscale_server.inference.cpu.methods import METHODS, CpuMethod, is_exact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeClass:
    """Windows up to ``max_pixels`` input pixels, timed on a ``probe`` x ``probe`` window."""

    name: str
    max_pixels: int | None
    probe: int


#: Window classes, smallest first, each timed at the size where the measured crossovers were seen
#: (Winograd ahead at 128² everywhere, behind direct at 256² on an AVX-512 Xeon). Windows above 256²
#: behave like 256² ones: their layers no longer fit the caches either way.
SHAPE_CLASSES: Final = (ShapeClass("small", 160 * 160, 128), ShapeClass("large", None, 256))
#: CPU flags that change which method wins (the rest of /proc/cpuinfo's list does not).
_RELEVANT_FLAGS: Final = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd")


def shape_class(height: int, width: int) -> ShapeClass:
    pixels = height * width
    return next(c for c in SHAPE_CLASSES if c.max_pixels is None or pixels <= c.max_pixels)


def cpu_description() -> tuple[str, tuple[str, ...]]:
    """The CPU's model name and the instruction sets among :data:`_RELEVANT_FLAGS` that it has."""
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, tuple(f for f in _RELEVANT_FLAGS if f in flags)


def machine_key(kernel_build: str) -> str:
    """What makes one machine's measurements valid for another process: CPU, flags, torch, kernel, threads."""
    model, flags = cpu_description()
    return (
        f"{model} [{' '.join(flags)}] torch {torch.__version__} kernel {kernel_build} threads {torch.get_num_threads()}"
    )


@dataclass(frozen=True)
class Choice:
    """The method for one (network, shape class), and why: the probe's seconds per candidate."""

    method: CpuMethod
    shape: str
    probe: int
    seconds: dict[str, float]
    reason: str  # "measured", "cached", "only candidate", "not measured"

    def describe(self) -> str:
        if not self.seconds:
            return f"{self.shape} windows: {self.method} ({self.reason})"
        timings = ", ".join(f"{m} {s:.2f} s" for m, s in sorted(self.seconds.items(), key=lambda kv: kv[1]))
        return f"{self.shape} windows: {self.method} ({self.reason}; {self.probe}² probe: {timings})"


#: ``measure(method, side)``: seconds for one network pass over a ``side`` x ``side`` window.
Measure = Callable[[CpuMethod, int], float]


class MethodTable:
    """The measured choices of one process, backed by a JSON file shared by every process on the machine.

    Thread-safe; measuring holds a lock, so two first windows never time each other's noise. A file
    that cannot be read or written is ignored (measured again next time) with one warning: the cache
    only saves time, it never decides correctness.
    """

    def __init__(self, path: Path | None, kernel_build: str) -> None:
        self.path = path
        self.machine = machine_key(kernel_build)
        self._lock = threading.Lock()
        self._choices: dict[str, Choice] = {}
        self._warned = False

    def choose(
        self, network: str, height: int, width: int, candidates: Sequence[CpuMethod], measure: Measure
    ) -> Choice:
        """The method for a ``height`` x ``width`` window of ``network`` among ``candidates``."""
        shape = shape_class(height, width)
        key = f"{network} | {shape.name} | {','.join(candidates)}"
        found = self._choices.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._choices.get(key) or self._read(key)
            if found is None:
                found = self._measure(network, shape, candidates, measure)
                self._write(key, found)
            self._choices[key] = found
            return found

    def choices(self) -> dict[str, Choice]:
        """Every choice this process made or read, by key (``network | class | candidates``)."""
        with self._lock:
            return dict(self._choices)

    def cached(self) -> dict[str, Choice]:
        """Every choice in the file for this machine (what ``upscale-server doctor`` shows)."""
        entries = self._load().get(self.machine, {})
        found = {key: _choice(value) for key, value in entries.items()} if isinstance(entries, dict) else {}
        return {key: choice for key, choice in found.items() if choice is not None}

    def _measure(self, network: str, shape: ShapeClass, candidates: Sequence[CpuMethod], measure: Measure) -> Choice:
        if len(candidates) == 1:
            return Choice(candidates[0], shape.name, shape.probe, {}, "only candidate")
        log.info(
            "measuring %s for %s on %s windows (once per machine; cached in %s)",
            ", ".join(candidates),
            network,
            shape.name,
            self.path,
        )
        seconds: dict[str, float] = {}
        for method in candidates:
            measure(method, 32)  # primitive creation, allocator warm-up
            seconds[method] = round(measure(method, shape.probe), 4)
        best = min(candidates, key=lambda m: seconds[m])
        choice = Choice(best, shape.name, shape.probe, seconds, "measured")
        log.info("%s, %s", network, choice.describe())
        return choice

    def _load(self) -> dict[str, dict[str, object]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError):  # nothing measured yet
            return {}
        except (OSError, ValueError) as exc:
            self._warn(f"cannot read {self.path} ({exc}); measuring again")
            return {}
        return data if isinstance(data, dict) else {}

    def _read(self, key: str) -> Choice | None:
        entry = self._load().get(self.machine, {})
        found = _choice(entry.get(key)) if isinstance(entry, dict) else None
        return None if found is None else Choice(**{**asdict(found), "reason": "cached"})

    def _write(self, key: str, choice: Choice) -> None:
        if self.path is None or choice.reason != "measured":
            return
        data = self._load()
        data.setdefault(self.machine, {})[key] = asdict(choice)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staged = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            staged.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            staged.replace(self.path)  # atomic: another process reads the old file or the new one
        except OSError as exc:
            self._warn(f"cannot write {self.path} ({exc}); the choice holds for this process only")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("CPU method cache: %s", message)


def _choice(value: object) -> Choice | None:
    """A cached entry, or None when it is not one this version understands."""
    if not isinstance(value, dict):
        return None
    try:
        choice = Choice(**value)
    except TypeError:
        return None
    return choice if choice.method in METHODS else None


def fastest_exact(candidates: Sequence[CpuMethod], choice: Choice) -> CpuMethod | None:
    """The fastest exact method measured for ``choice``, or the first exact candidate, or None."""
    exact = [m for m in candidates if is_exact(m)]
    timed = [m for m in exact if m in choice.seconds]
    if timed:
        return min(timed, key=lambda m: choice.seconds[m])
    return exact[0] if exact else None


def probe_seconds(run: Callable[[], object]) -> float:
    """Wall time of one call (the probes are seconds long: one run is steadier than it is costly)."""
    started = time.perf_counter()
    run()
    return time.perf_counter() - started

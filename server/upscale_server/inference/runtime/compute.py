"""Where and how networks run: the compute settings resolved once, and the process-wide tuning.

:class:`ComputeConfig` is pure (it reads the settings and the machine, changes nothing), so tests and
embedders can build servers freely; :func:`tune_process` changes the process (torch's thread count,
glibc's allocator) and is called once, by the entry point that owns the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch

from upscale_server.config import Settings, UnusableSettingError
from upscale_server.inference.cpu import kernel
from upscale_server.inference.cpu.methods import CpuMethod, candidates
from upscale_server.inference.runtime.devices import (
    configure_threads,
    cpu_has_fast_bf16,
    resolve_device,
    resolve_dtype,
    tune_cpu_allocator,
)


@dataclass(frozen=True)
class ComputeConfig:
    """Where and how networks run; resolved once from settings so every model agrees."""

    device: torch.device
    dtype: torch.dtype
    tile_size: int
    tile_overlap: int | None
    compile_module: bool = False
    convolution: str = "auto"
    batch_window_s: float = 0.0  # 0: no cross-request batching
    max_batch: int = 1
    #: CPU only: the methods the engine may choose among (measured per window class when several).
    cpu_methods: tuple[CpuMethod, ...] = ()
    method_cache: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ComputeConfig:
        """Resolve the compute settings; UnusableSettingError when this machine cannot honour one.

        Pure: process-wide tuning (threads, allocator) is the entry point's job (:func:`tune_process`)."""
        try:
            device = resolve_device(settings.device)
            dtype = resolve_dtype(settings.precision, device)
        except ValueError as exc:
            raise UnusableSettingError(str(exc)) from None
        cpu_methods: tuple[CpuMethod, ...] = ()
        if device.type == "cpu":
            if settings.cpu_convolution == "winograd" and not kernel.available():
                reason = kernel.unavailable_reason()
                raise UnusableSettingError(
                    f"cpu_convolution 'winograd' needs its kernel, which is unavailable ({reason}); "
                    "use 'auto' or 'direct'"
                )
            cpu_methods = candidates(
                settings.precision,
                settings.cpu_convolution,
                winograd_ok=kernel.available(),
                native_bf16=cpu_has_fast_bf16(),
            )
        return cls(
            device=device,
            dtype=dtype,
            tile_size=settings.tile_size,
            tile_overlap=settings.tile_overlap,
            compile_module=settings.compile,
            convolution=settings.cpu_convolution,
            batch_window_s=settings.batch_window_ms / 1000,
            max_batch=settings.max_batch,
            cpu_methods=cpu_methods,
            method_cache=settings.cpu_method_cache or default_method_cache(),
        )

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        tiles = f"tile {self.tile_size or 'auto'}, overlap {'auto' if self.tile_overlap is None else self.tile_overlap}"
        extras = ""
        if self.device.type == "cpu":
            dtype = "/".join(self.cpu_methods)
            if len(self.cpu_methods) > 1:
                extras = " (fastest measured per window size)"
        extras += ", torch.compile" if self.compile_module else ""
        if self.batch_window_s > 0:
            extras += f", batches of up to {self.max_batch} tiles within {self.batch_window_s * 1000:g} ms"
        return f"{self.device} {dtype}, {tiles}, {torch.get_num_threads()} threads{extras}"


def default_method_cache() -> Path:
    """Where CPU method measurements are kept unless ``cpu_method_cache`` says otherwise."""
    return platformdirs.user_cache_path("upscale-server", appauthor=False) / "cpu-methods.json"


def tune_process(settings: Settings, device: torch.device) -> None:
    """Process-wide tuning for inference: torch's thread count and, on the CPU, glibc's allocator.

    Applied once, by the entry point that owns the process (``serve``, ``upscale``), never by a
    constructor: tests and embedders build servers without changing their own process."""
    if device.type == "cpu":
        tune_cpu_allocator()
    configure_threads(settings.threads)

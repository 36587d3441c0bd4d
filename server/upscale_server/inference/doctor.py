"""``upscale-server doctor``: what this machine offers and what the engine chose on it, and why.

Speed questions ("why is it slow here?") start with the hardware and the choices made on it: the CPU
and its instruction sets, the GPU, the Winograd kernel build, the compute settings as resolved, and
the CPU method measured for each model and window size. ``--measure`` loads a model and measures its
methods now (once per machine; later runs read the cache).
"""

from __future__ import annotations

import torch

from upscale_server.config import Settings
from upscale_server.inference.cpu import kernel
from upscale_server.inference.cpu.tuning import MethodTable, cpu_description
from upscale_server.inference.registry import ModelRegistry
from upscale_server.inference.runtime.compute import ComputeConfig
from upscale_server.inference.runtime.devices import configure_threads, cpu_has_fast_bf16


def report(settings: Settings, *, measure_model: str | None, measure: bool) -> list[str]:
    """The doctor's lines. Raises UnusableSettingError (settings this machine cannot honour) or an
    :class:`~upscale_server.errors.UpscaleError` (a model that cannot be loaded for ``--measure``)."""
    configure_threads(settings.threads)
    model, flags = cpu_description()
    lines = [
        f"CPU: {model}; {torch.get_num_threads()} threads; instruction sets: {' '.join(flags) or 'none of note'}",
        f"native bf16 (AVX512-BF16 or AMX, as oneDNN sees it): {'yes' if cpu_has_fast_bf16() else 'no'}",
        f"torch {torch.__version__}; CUDA: {_cuda()}",
        f"Winograd kernel: {kernel.build_id() if kernel.available() else 'not available (exact mode: direct only)'}",
    ]
    compute = ComputeConfig.from_settings(settings)
    lines.append(f"compute: {compute.describe()}")
    if compute.device.type != "cpu":
        return lines
    lines.append(f"CPU methods allowed: {', '.join(compute.cpu_methods)} {_why(settings, compute.cpu_methods)}")
    if len(compute.cpu_methods) < 2:
        return lines
    if measure:
        _measure(settings, compute, measure_model)
    table = MethodTable(compute.method_cache, kernel.build_id())
    cached = table.cached()
    lines.append(f"measured on this machine ({compute.method_cache}):")
    if not cached:
        lines.append("  nothing yet: each model is measured when it is first loaded (or run `doctor --measure`)")
    for key, choice in sorted(cached.items()):
        network, _, _allowed = key.split(" | ")
        lines.append(f"  {network}: {choice.describe()}")
    return lines


def _cuda() -> str:
    if not torch.cuda.is_available():
        return "not available"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{torch.version.cuda}, " + ", ".join(names)


def _why(settings: Settings, methods: tuple[str, ...]) -> str:
    reasons = [f"precision {settings.precision}", f"convolution {settings.cpu_convolution}"]
    if settings.precision == "auto" and "bf16" not in methods:
        reasons.append("no native bf16, so bf16 is not a candidate")
    return f"({'; '.join(reasons)})"


def _measure(settings: Settings, compute: ComputeConfig, model_id: str | None) -> None:
    registry = ModelRegistry(settings, compute)
    try:
        registry.upscaler(registry.spec(model_id))  # loading measures every window class
    finally:
        registry.close()

"""The ways a network can run on the CPU, and how each one is built from the same fp32 weights.

* ``winograd``: exact (fp32). The architecture's Winograd form
  (:mod:`upscale_server.inference.cpu.winograd`): 4x fewer multiplications for 3x3 convolutions,
  within 0.01 levels of direct convolutions. Needs the compiled kernel.
* ``direct``: exact (fp32). oneDNN's direct convolutions over the module in ``channels_last``.
* ``bf16``: the fast mode, a few tenths of a level off on average. A bfloat16 copy of the module whose
  convolutions hold their weights pre-packed in oneDNN's blocked layout and run as inference
  primitives, instead of autocast, which casts every weight on every call, and eager bf16
  convolutions, which oneDNN runs as training primitives that reorder their weights on every call
  (seen on an AMX Xeon). On an AVX512-BF16 Xeon without AMX the two ran alike (x4plus: 3.64 s vs
  3.66 s at 128², 14.9 s vs 14.7 s at 256²) and both at half the fp32 speed, which is why bf16 is
  only ever chosen by measurement.

Which one is fastest depends on the CPU and the window size (Winograd wins on an AVX2-only EPYC;
oneDNN's direct convolutions win at 256² on an AVX-512 Xeon; bf16 only pays where the cores have
native bf16 arithmetic, and not even always there), so the engine measures
(:mod:`upscale_server.inference.cpu.tuning`) instead of assuming.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Final, Literal, get_args

import torch
from torch import nn

from upscale_server.inference.archs.base import Architecture

CpuMethod = Literal["winograd", "direct", "bf16"]
METHODS: Final[tuple[CpuMethod, ...]] = get_args(CpuMethod)
#: The methods that give the exact (fp32) result, fastest-first by default where nothing is measured.
EXACT_METHODS: Final[tuple[CpuMethod, ...]] = ("winograd", "direct")
#: A runner maps an fp32 NCHW (channels_last) window to the network's fp32 output.
Runner = Callable[[torch.Tensor], torch.Tensor]


def is_exact(method: CpuMethod) -> bool:
    return method in EXACT_METHODS


def candidates(precision: str, convolution: str, *, winograd_ok: bool, native_bf16: bool) -> tuple[CpuMethod, ...]:
    """The methods the settings allow on this machine, in the order used when nothing is measured.

    ``precision`` fp32 keeps the exact methods, bf16 the fast one, auto both (bf16 only where the CPU
    has native bf16 arithmetic: emulated bf16 is about 10x slower than fp32, never a candidate).
    ``convolution`` (winograd, direct, auto) narrows the exact methods.
    """
    exact: list[CpuMethod] = []
    if convolution in ("auto", "winograd") and winograd_ok:
        exact.append("winograd")
    if convolution in ("auto", "direct"):
        exact.append("direct")
    if precision == "bf16":
        return ("bf16",)
    if precision == "auto" and native_bf16:
        return (*exact, "bf16")
    return tuple(exact)


class PrepackedConv2d(nn.Module):
    """A convolution whose weight is reordered once into oneDNN's blocked layout (inference only).

    ``torch.ops.mkldnn._convolution_pointwise`` is the operator PyTorch's own compiler emits for frozen
    CPU graphs; it takes the packed weight as is, so no reorder happens per call."""

    #: Hooks that act on every convolution's input (the device pipeline's masks) treat it as one.
    is_convolution = True

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, probe_hw: tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise ValueError("only explicitly padded zero-padding convolutions can be pre-packed")
        self.padding = list(conv.padding)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        weight = conv.weight.detach().to(dtype)
        self.register_buffer(
            "packed",
            torch.ops.mkldnn._reorder_convolution_weight(
                weight, self.padding, self.stride, self.dilation, self.groups, [1, conv.in_channels, *probe_hw]
            ),
            persistent=False,
        )
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._convolution_pointwise(
            x, self.packed, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
        )
        return out


def prepacked(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` in ``dtype`` with every convolution pre-packed (the original is untouched)."""
    clone = copy.deepcopy(module).to(dtype)
    _replace_convolutions(clone, dtype)
    return clone.eval()


def _replace_convolutions(parent: nn.Module, dtype: torch.dtype) -> None:
    for name, child in parent.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(parent, name, PrepackedConv2d(child, dtype))
        else:
            _replace_convolutions(child, dtype)


class Bf16Network(nn.Module):
    """fp32 in, fp32 out, bf16 inside: the bf16 method's runner."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.network(x.to(torch.bfloat16))
        return out.float()


def build(method: CpuMethod, arch: Architecture, module: nn.Module) -> Runner:
    """The runner for ``method`` over ``module`` (fp32, eval, ``channels_last``, shared, never changed).

    ValueError when ``method`` cannot run here (Winograd without its kernel or without a form for
    this architecture, bf16 where the oneDNN build lacks it)."""
    if method == "direct":
        return module
    if method == "winograd":
        from upscale_server.inference.cpu import kernel

        fast = arch.winograd_form(module) if kernel.available() else None
        if fast is None:
            reason = kernel.unavailable_reason() or f"{arch.name} has no Winograd form"
            raise ValueError(
                f"Winograd convolutions are not available here ({reason}); use convolution 'direct' or 'auto'"
            )
        return fast
    if method == "bf16":
        return Bf16Network(prepacked(module, torch.bfloat16))
    raise ValueError(f"unknown CPU method {method!r}: use one of {', '.join(METHODS)}")

"""What the rest of inference knows about a network architecture: its descriptor.

Each architecture module (:mod:`~upscale_server.inference.archs.rrdbnet`,
:mod:`~upscale_server.inference.archs.srvgg`) holds the ``nn.Module`` and one :class:`Architecture`
describing it. Weights, the engine and the CPU kernels ask the descriptor instead of testing the
architecture's name, so a new architecture is one new module and one line in the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

from upscale_server.errors import ModelLoadError

#: Every supported model maps RGB to RGB.
RGB = 3


@dataclass(frozen=True)
class ArchInfo:
    """What a state dict says about its network: enough to build the module again.

    ``arch`` is the descriptor's :attr:`Architecture.name`; ``params`` uses the constructor's keyword
    names (:attr:`Architecture.params`), the same keys the manifest's ``params`` table uses, so the
    two compare directly.
    """

    arch: str
    scale: int
    params: Mapping[str, int | str] = field(hash=False)

    def __post_init__(self) -> None:
        # A read-only copy: the info is shared between threads and cached models.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


@dataclass(frozen=True)
class NcnnSlot:
    """One weighted layer of an architecture's ncnn graph, in graph order."""

    prefix: str  # BasicSR name without ".weight"/".bias"
    kind: str  # "Convolution" or "PReLU"
    leaky_slope: float | None = None  # a Convolution with a fused leaky ReLU of this slope


@dataclass(frozen=True)
class NcnnLayout:
    """How an architecture's weights appear in a Real-ESRGAN-ncnn-vulkan graph."""

    slots: tuple[NcnnSlot, ...]
    #: The factor every ``PixelShuffle`` layer must have; None when the graph has none to check.
    pixel_shuffle: int | None = None


class Architecture(ABC):
    """One network architecture, described for everything that handles its networks.

    * weights: :meth:`claims`, :meth:`own_names` and :meth:`detect` (the state dict is the only
      description trusted),
      :attr:`params` and :attr:`scales` (what a manifest entry must give), :meth:`build`, and
      :meth:`ncnn_layout` (how the official ncnn files map onto the module's names);
    * the engine: :meth:`size_multiple`, :attr:`default_tile_overlap`, the memory model
      :meth:`peak_values_per_input_pixel`, and :attr:`supports_half` / :attr:`supports_bf16`;
    * the CPU kernels: :meth:`winograd_form`.
    """

    #: The name weight files, the manifest (``arch``) and converted files' metadata use.
    name: ClassVar[str]
    #: Hyper-parameter names, as the constructor's keywords and the manifest's ``params`` keys.
    params: ClassVar[tuple[str, ...]]
    #: The scales the architecture can be built for; None: any positive integer.
    scales: ClassVar[tuple[int, ...] | None] = None
    #: Context pixels on each side of a tile when the caller gives none (how far inward the zero
    #: padding at a window edge still shows, measured on the real weights).
    default_tile_overlap: ClassVar[int]
    #: Whether the network runs in float16 (CUDA) and bfloat16 (CUDA, CPU autocast); an engine asked
    #: for an unsupported one runs float32 instead.
    supports_half: ClassVar[bool] = True
    supports_bf16: ClassVar[bool] = True

    @abstractmethod
    def claims(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``state`` has this architecture's key signature (then :meth:`detect` decides the rest)."""

    def own_names(self, state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor] | None:
        """``state`` under this architecture's own key names when it is in a layout the architecture
        knows (another trainer's naming included), else None. Renaming only: :meth:`detect` and a
        strict load still decide whether every tensor fits."""
        return dict(state) if self.claims(state) else None

    @abstractmethod
    def detect(self, state: Mapping[str, torch.Tensor], where: str) -> ArchInfo:
        """Scale and hyper-parameters read from the keys and tensor shapes; ModelLoadError naming ``where``."""

    @abstractmethod
    def build(self, info: ArchInfo) -> nn.Module:
        """A fresh (randomly initialised) module for ``info``; load weights into it afterwards."""

    def size_multiple(self, scale: int) -> int:
        """What input sides must be a multiple of at ``scale`` (the engine pads to it)."""
        return 1

    @abstractmethod
    def peak_values_per_input_pixel(self, scale: int) -> int:
        """The memory model: estimated peak activation values per input pixel of a window at ``scale``."""

    def largest_activation_per_input_pixel(self, scale: int) -> int:
        """Values per input pixel of the largest single tensor a window makes (a batch of windows makes
        it ``batch`` times larger). Kernels index tensors with 32-bit integers, so the engine caps
        windows to keep it under 2**31 elements. The default, the whole peak, is safe but loose."""
        return self.peak_values_per_input_pixel(scale)

    @abstractmethod
    def ncnn_layout(self, info: ArchInfo) -> NcnnLayout:
        """The weighted layers the official ncnn graph of ``info`` has, in order."""

    @abstractmethod
    def winograd_form(self, module: nn.Module) -> nn.Module | None:
        """The same network with Winograd convolutions (sharing ``module``'s weights), or None when
        ``module`` is not this architecture's. Needs the CPU kernel to run."""

    def __repr__(self) -> str:
        return f"<architecture {self.name}>"


def tensor_shape(state: Mapping[str, torch.Tensor], key: str, ndim: int, where: str) -> tuple[int, ...]:
    """The shape of ``state[key]``, which must exist with ``ndim`` dimensions (ModelLoadError otherwise)."""
    tensor = state.get(key)
    if tensor is None:
        raise ModelLoadError(f"{where}: missing {key}")
    if tensor.ndim != ndim:
        raise ModelLoadError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {ndim} dimensions")
    return tuple(tensor.shape)


def int_param(params: Mapping[str, int | str], key: str) -> int:
    value = params[key]
    if not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value

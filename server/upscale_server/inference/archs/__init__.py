"""The network architectures the server runs, and the registry of their descriptors.

A weight file can be any supported variant: :func:`detect` asks each descriptor whether the state
dict is its own and reads the hyper-parameters from its shapes. Nothing outside the descriptors
dispatches on an architecture's name; code that has a name (the manifest, a converted file's
metadata) looks the descriptor up with :func:`by_name`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

import torch
from torch import nn

from upscale_server.errors import ModelLoadError
from upscale_server.inference.archs import rrdbnet, srvgg
from upscale_server.inference.archs.base import ArchInfo, Architecture

#: Every supported architecture, in detection order.
ARCHITECTURES: Final[tuple[Architecture, ...]] = (rrdbnet.DESCRIPTOR, srvgg.DESCRIPTOR)


def names() -> tuple[str, ...]:
    return tuple(arch.name for arch in ARCHITECTURES)


def by_name(name: str) -> Architecture:
    """The descriptor called ``name``; ValueError for an unknown one."""
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise ValueError(f"unknown architecture {name!r} (known: {', '.join(names())})")


def recognise(
    state_dict: Mapping[str, torch.Tensor], *, source: Path | None = None
) -> tuple[Architecture, ArchInfo, dict[str, torch.Tensor]]:
    """The architecture of ``state_dict``, its scale and hyper-parameters (read from keys and shapes),
    and the state dict under the architecture's own names (ESRGAN's original layout is renamed).

    Raises :class:`ModelLoadError` naming ``source`` for anything else (other architectures, non-RGB
    variants).
    """
    where = str(source) if source is not None else "state dict"
    for arch in ARCHITECTURES:
        state = arch.own_names(state_dict, where)
        if state is not None:
            return arch, arch.detect(state, where), state
    sample = ", ".join(sorted(state_dict)[:4])
    raise ModelLoadError(
        f"{where}: not a known architecture (expected Real-ESRGAN {' or '.join(names())} keys; "
        f"found {sample}{', ...' if len(state_dict) > 4 else ''})"
    )


def detect(state_dict: Mapping[str, torch.Tensor], *, source: Path | None = None) -> tuple[Architecture, ArchInfo]:
    """:func:`recognise` without the renamed state dict."""
    arch, info, _ = recognise(state_dict, source=source)
    return arch, info


def build(info: ArchInfo) -> nn.Module:
    """A fresh (randomly initialised) module for ``info``; load weights into it afterwards."""
    return by_name(info.arch).build(info)


__all__ = ["ARCHITECTURES", "ArchInfo", "Architecture", "build", "by_name", "detect", "names", "recognise"]

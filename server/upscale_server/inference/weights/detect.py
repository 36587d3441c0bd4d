"""What a weight file holds, decided from its state dict alone, with strict key matching.

A file someone dropped in has no manifest entry to vouch for it, so the keys and shapes are the whole
description: the architecture's descriptor recognises its layout and reads the hyper-parameters, and
every tensor must then fit the module those parameters build, name for name and shape for shape.
Refusals are one line naming the file, because they end up in a listing next to the other files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from upscale_server.errors import ModelLoadError
from upscale_server.inference import archs
from upscale_server.inference.archs.base import ArchInfo, Architecture


@dataclass(frozen=True)
class Detection:
    """A recognised state dict: the architecture, its hyper-parameters and the tensors under its names."""

    arch: Architecture
    info: ArchInfo
    state: dict[str, torch.Tensor]


def _listed(keys: set[str]) -> str:
    shown = sorted(keys)[:3]
    return ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_fit(arch: Architecture, info: ArchInfo, state: Mapping[str, torch.Tensor], where: str) -> None:
    """ModelLoadError (one line) unless ``state`` has exactly the module's keys with the module's shapes."""
    with torch.device("meta"):  # shapes only: no memory, no random init
        template = {k: tuple(v.shape) for k, v in arch.build(info).state_dict().items()}
    missing, extra = set(template) - set(state), set(state) - set(template)
    if missing:
        raise ModelLoadError(f"{where}: weights do not fit {info.arch}: missing {_listed(missing)}")
    if extra:
        raise ModelLoadError(f"{where}: weights do not fit {info.arch}: unexpected {_listed(extra)}")
    for key, shape in template.items():
        if tuple(state[key].shape) != shape:
            got = tuple(state[key].shape)
            raise ModelLoadError(f"{where}: weights do not fit {info.arch}: {key} has shape {got}, expected {shape}")


def detect_state(state: Mapping[str, torch.Tensor], where: str) -> Detection:
    """Recognise ``state`` and check that it fits; ModelLoadError naming ``where`` otherwise."""
    arch, info, own = archs.recognise(state, source=Path(where))
    check_fit(arch, info, own, where)
    return Detection(arch, info, own)

"""Read a weight file, tell which architecture it holds, and load it into the matching module.

The state dict is the only description we trust: a dropped-in file can be any Real-ESRGAN variant, so
the hyper-parameters (block count, widths, scale) are read from its keys and tensor shapes rather
than from the file name. ``.pth`` files are read with ``weights_only=True`` so a pickle can never run
code; anything we cannot read or recognise becomes a :class:`~upscale_server.errors.ModelLoadError` that
names the file, because the user has to know which file to replace.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from upscale_server.errors import ModelLoadError
from upscale_server.inference.archs.base import ArchInfo, Architecture
from upscale_server.inference.weights.detect import Detection, detect_state

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = frozenset({".pth", ".pt"})
SAFETENSORS_SUFFIX = ".safetensors"

_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class LoadedNetwork:
    """A ready module (eval mode, fp32, on CPU, no gradients) with what it is and where it came from."""

    module: nn.Module
    arch: Architecture
    info: ArchInfo
    path: Path


#: Wrappers around the state dict in common use, in order of preference: BasicSR's EMA weights (the
#: ones to use), its plain weights, and a training checkpoint's ``state_dict``.
WRAPPER_KEYS = ("params_ema", "params", "state_dict")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors inside one of :data:`WRAPPER_KEYS`, or the bare dict itself."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelLoadError(f"{path}: not a state dict (found {type(obj).__name__})")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"{path}: not a state dict (entry {key!r} is a {type(value).__name__})")
        state[key] = value
    return state


def _first_line(exc: BaseException) -> str:
    """The gist of a library error: its first sentence, without ANSI styling or multi-line advice."""
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(exc).__name__


def _torch_load(path: Path, *, mmap: bool) -> object:
    """``torch.load`` weights-only; ``mmap`` maps a zip checkpoint instead of reading its tensors (an
    old-format file cannot be mapped and is read whole)."""
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read ``.pth``/``.pt`` (weights-only unpickling) or ``.safetensors`` into a flat tensor dict.

    ``mmap``: leave a ``.pth``'s tensors on disk until used (detection only looks at shapes)."""
    suffix = path.suffix.lower()
    try:
        if suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        elif suffix in TORCH_SUFFIXES:
            obj = _torch_load(path, mmap=mmap)
        else:
            raise ModelLoadError(f"{path}: unsupported weight file type {suffix!r} (use .safetensors, .pth)")
    except ModelLoadError:
        raise
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: file not found") from exc
    except pickle.UnpicklingError as exc:
        # weights_only refuses anything but tensors and plain containers. Torch's message advises
        # turning the protection off, which is not advice we pass on; name what it tripped over.
        unsafe = _UNSAFE_GLOBAL.search(str(exc))
        if unsafe:
            reason = f"refused: the pickle references {unsafe.group(1)}, not just tensors"
        else:
            reason = "not a readable PyTorch weight file (corrupt, or not a checkpoint)"
        raise ModelLoadError(f"{path}: {reason}") from exc
    except Exception as exc:  # torch/safetensors raise many types for corrupt files
        raise ModelLoadError(f"{path}: cannot read weights ({type(exc).__name__}: {_first_line(exc)})") from exc
    return _unwrap(obj, path)


def detect_file(path: Path) -> Detection:
    """Read ``path`` (weights-only) and recognise it: architecture, hyper-parameters, fitted tensors."""
    return detect_state(read_state_dict(path), str(path))


def load_network(path: Path) -> LoadedNetwork:
    """Read, detect, build and strictly load; the module comes back frozen for inference on CPU."""
    found = detect_file(path)
    arch, info = found.arch, found.info
    try:
        module = arch.build(info)
        module.load_state_dict(found.state, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: weights do not fit {info.arch}: {_first_line(exc)}") from exc
    module = module.float().eval().requires_grad_(False)
    logger.info("loaded %s x%d %s from %s", info.arch, info.scale, dict(info.params), path)
    return LoadedNetwork(module=module, arch=arch, info=info, path=path)

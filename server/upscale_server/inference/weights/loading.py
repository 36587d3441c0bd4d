"""Read a weight file, tell which architecture it holds, and build the matching module.

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
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import torch
from torch import nn

from upscale_server.errors import ModelLoadError
from upscale_server.inference.archs import RRDBNet, SRVGGNetCompact

logger = logging.getLogger(__name__)

ArchName = Literal["RRDBNet", "SRVGGNetCompact"]
ARCH_NAMES: tuple[ArchName, ...] = ("RRDBNet", "SRVGGNetCompact")

TORCH_SUFFIXES = frozenset({".pth", ".pt"})
SAFETENSORS_SUFFIX = ".safetensors"

#: RRDBNet's first conv sees 3 channels at scale 4, and pixel-unshuffled 12 / 48 at scale 2 / 1.
_RRDB_SCALE_BY_IN_CH = {3: 4, 12: 2, 48: 1}
_RRDB_BLOCK = re.compile(r"^body\.(\d+)\.rdb1\.conv1\.weight$")
_SRVGG_LAYER = re.compile(r"^body\.(\d+)\.weight$")
RGB = 3
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ArchInfo:
    """What a state dict says about its network: enough to build the module again.

    ``params`` uses the constructor's keyword names (RRDBNet: ``num_block``, ``num_feat``,
    ``num_grow_ch``; SRVGGNetCompact: ``num_feat``, ``num_conv``, ``act_type``), the same keys the
    manifest's ``params`` table uses, so the two compare directly.
    """

    arch: ArchName
    scale: int
    params: Mapping[str, int | str] = field(hash=False)

    def __post_init__(self) -> None:
        # A read-only copy: the info is shared between threads and cached models.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


@dataclass(frozen=True)
class LoadedNetwork:
    """A ready module (eval mode, fp32, on CPU, no gradients) with what it is and where it came from."""

    module: nn.Module
    info: ArchInfo
    path: Path


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """BasicSR saves ``{"params_ema": sd}`` (EMA weights, the ones to use) or ``{"params": sd}``."""
    if isinstance(obj, Mapping):
        for key in ("params_ema", "params"):
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
    """The gist of a library error, without ANSI styling or multi-line advice."""
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read ``.pth``/``.pt`` (weights-only unpickling) or ``.safetensors`` into a flat tensor dict."""
    suffix = path.suffix.lower()
    try:
        if suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        elif suffix in TORCH_SUFFIXES:
            obj = torch.load(path, map_location="cpu", weights_only=True)
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


def _where(source: Path | None) -> str:
    return str(source) if source is not None else "state dict"


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int, where: str) -> tuple[int, ...]:
    tensor = state.get(key)
    if tensor is None:
        raise ModelLoadError(f"{where}: missing {key}")
    if tensor.ndim != ndim:
        raise ModelLoadError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {ndim} dimensions")
    return tuple(tensor.shape)


def _detect_rrdb(state: Mapping[str, torch.Tensor], where: str) -> ArchInfo:
    num_feat, in_ch, _, _ = _shape(state, "conv_first.weight", 4, where)
    blocks = {int(m.group(1)) for key in state if (m := _RRDB_BLOCK.match(key))}
    num_block = len(blocks)
    if blocks != set(range(num_block)):
        raise ModelLoadError(f"{where}: RRDBNet body blocks are not numbered 0..{num_block - 1}")
    num_grow_ch = _shape(state, "body.0.rdb1.conv1.weight", 4, where)[0]
    out_ch = _shape(state, "conv_last.weight", 4, where)[0]
    scale = _RRDB_SCALE_BY_IN_CH.get(in_ch)
    if scale is None or out_ch != RGB:
        raise ModelLoadError(
            f"{where}: RRDBNet with {in_ch} input / {out_ch} output channels is not an RGB model "
            "(expected 3, 12 or 48 in and 3 out)"
        )
    params = {"num_block": num_block, "num_feat": num_feat, "num_grow_ch": num_grow_ch}
    return ArchInfo("RRDBNet", scale, params)


def _detect_srvgg(state: Mapping[str, torch.Tensor], where: str) -> ArchInfo:
    conv_idx = sorted(int(m.group(1)) for key, t in state.items() if (m := _SRVGG_LAYER.match(key)) and t.ndim == 4)
    # Convs sit at even indices 0, 2, ..., 2 * num_conv + 2; activations in between.
    if len(conv_idx) < 2 or conv_idx != list(range(0, 2 * len(conv_idx), 2)):
        raise ModelLoadError(f"{where}: SRVGGNetCompact body convs are not at body.0, body.2, ...")
    num_conv = len(conv_idx) - 2
    num_feat, in_ch, _, _ = _shape(state, "body.0.weight", 4, where)
    last_out = _shape(state, f"body.{conv_idx[-1]}.weight", 4, where)[0]
    upscale = round((last_out / RGB) ** 0.5)
    if in_ch != RGB or upscale < 1 or RGB * upscale * upscale != last_out:
        raise ModelLoadError(
            f"{where}: SRVGGNetCompact with {in_ch} input channels and a last conv of {last_out} "
            "channels is not an RGB model (expected 3 in and 3 * scale^2 out)"
        )
    # Only PReLU has weights; ReLU and LeakyReLU leave no trace, and the official models never use
    # them, so a body without slopes is assumed to be ReLU (BasicSR's other parameter-free choice).
    act_type = "prelu" if "body.1.weight" in state else "relu"
    params: dict[str, int | str] = {"num_feat": num_feat, "num_conv": num_conv, "act_type": act_type}
    return ArchInfo("SRVGGNetCompact", upscale, params)


def detect_architecture(state_dict: Mapping[str, torch.Tensor], *, source: Path | None = None) -> ArchInfo:
    """Tell RRDBNet from SRVGGNetCompact by their keys and read the hyper-parameters from shapes.

    Raises :class:`ModelLoadError` naming ``source`` for anything else (old ESRGAN key names,
    other architectures, non-RGB variants).
    """
    where = _where(source)
    if "conv_first.weight" in state_dict and "body.0.rdb1.conv1.weight" in state_dict:
        return _detect_rrdb(state_dict, where)
    if "body.0.weight" in state_dict and "conv_first.weight" not in state_dict:
        return _detect_srvgg(state_dict, where)
    sample = ", ".join(sorted(state_dict)[:4])
    raise ModelLoadError(
        f"{where}: not a known architecture (expected Real-ESRGAN RRDBNet or SRVGGNetCompact keys; "
        f"found {sample}{', ...' if len(state_dict) > 4 else ''})"
    )


def _int(params: Mapping[str, int | str], key: str) -> int:
    value = params[key]
    if not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def build_network(info: ArchInfo) -> nn.Module:
    """A fresh (randomly initialised) module for ``info``; load weights into it afterwards."""
    params = info.params
    if info.arch == "RRDBNet":
        return RRDBNet(
            num_in_ch=RGB,
            num_out_ch=RGB,
            scale=info.scale,
            num_feat=_int(params, "num_feat"),
            num_block=_int(params, "num_block"),
            num_grow_ch=_int(params, "num_grow_ch"),
        )
    if info.arch == "SRVGGNetCompact":
        return SRVGGNetCompact(
            num_in_ch=RGB,
            num_out_ch=RGB,
            num_feat=_int(params, "num_feat"),
            num_conv=_int(params, "num_conv"),
            upscale=info.scale,
            act_type=str(params.get("act_type", "prelu")),
        )
    raise ValueError(f"unknown architecture {info.arch!r}")


def load_network(path: Path) -> LoadedNetwork:
    """Read, detect, build and strictly load; the module comes back frozen for inference on CPU."""
    state = read_state_dict(path)
    info = detect_architecture(state, source=path)
    try:
        module = build_network(info)
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: weights do not fit {info.arch}: {exc}") from exc
    module = module.float().eval().requires_grad_(False)
    logger.info("loaded %s x%d %s from %s", info.arch, info.scale, dict(info.params), path)
    return LoadedNetwork(module=module, info=info, path=path)

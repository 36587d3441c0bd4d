"""Weight files -> detected architecture -> strictly loaded module, and refusal of everything else."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from upscale_server.errors import ModelLoadError
from upscale_server.inference import archs
from upscale_server.inference.archs.base import ArchInfo
from upscale_server.inference.archs.rrdbnet import RRDBNet
from upscale_server.inference.archs.srvgg import SRVGGNetCompact
from upscale_server.inference.weights.loading import load_network, read_state_dict

CASES: dict[str, tuple[Callable[[], torch.nn.Module], ArchInfo]] = {
    "rrdb_x4": (
        lambda: RRDBNet(scale=4, num_feat=16, num_block=2, num_grow_ch=8),
        ArchInfo("RRDBNet", 4, {"num_block": 2, "num_feat": 16, "num_grow_ch": 8}),
    ),
    "rrdb_x2": (
        lambda: RRDBNet(scale=2, num_feat=8, num_block=3, num_grow_ch=4),
        ArchInfo("RRDBNet", 2, {"num_block": 3, "num_feat": 8, "num_grow_ch": 4}),
    ),
    "rrdb_x1": (
        lambda: RRDBNet(scale=1, num_feat=8, num_block=1, num_grow_ch=4),
        ArchInfo("RRDBNet", 1, {"num_block": 1, "num_feat": 8, "num_grow_ch": 4}),
    ),
    "srvgg_x4": (
        lambda: SRVGGNetCompact(num_feat=16, num_conv=4, upscale=4),
        ArchInfo("SRVGGNetCompact", 4, {"num_feat": 16, "num_conv": 4, "act_type": "prelu"}),
    ),
    "srvgg_x2": (
        lambda: SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2),
        ArchInfo("SRVGGNetCompact", 2, {"num_feat": 8, "num_conv": 2, "act_type": "prelu"}),
    ),
}


def _random_state(factory: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(1234)
    net = factory().eval()
    with torch.no_grad():
        for p in net.parameters():  # beyond the default init, so a swapped tensor would show
            p.add_(torch.randn_like(p) * 0.05)
    return net, {k: v.clone() for k, v in net.state_dict().items()}


def _save(state: dict[str, torch.Tensor], path: Path, wrapping: str) -> None:
    if wrapping == "safetensors":
        save_file(state, str(path))
    elif wrapping == "params_ema":
        torch.save({"params_ema": state}, path)
    elif wrapping == "params":
        torch.save({"params": state}, path)
    else:
        torch.save(state, path)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("wrapping", ["params_ema", "params", "bare", "safetensors"])
def test_round_trip_gives_same_arch_and_outputs(case: str, wrapping: str, tmp_path: Path) -> None:
    factory, expected = CASES[case]
    net, state = _random_state(factory)
    path = tmp_path / ("w.safetensors" if wrapping == "safetensors" else "w.pth")
    _save(state, path, wrapping)

    loaded = load_network(path)

    assert loaded.info == expected
    assert loaded.arch is archs.by_name(expected.arch)
    assert loaded.path == path
    assert isinstance(loaded.module, type(net))
    x = torch.rand(1, 3, 8, 12)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), net(x))
    assert loaded.module(x).shape == (1, 3, 8 * expected.scale, 12 * expected.scale)


def test_loaded_module_is_frozen_fp32_eval(tmp_path: Path) -> None:
    _, state = _random_state(CASES["srvgg_x4"][0])
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in state.items()}, str(path))  # fp16 on disk, like ncnn conversions
    module = load_network(path).module
    assert not module.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())
    assert all(p.device.type == "cpu" for p in module.parameters())


def test_params_ema_is_preferred_over_params(tmp_path: Path) -> None:
    _, ema = _random_state(CASES["srvgg_x2"][0])
    plain = {k: torch.zeros_like(v) for k, v in ema.items()}
    path = tmp_path / "both.pth"
    torch.save({"params": plain, "params_ema": ema}, path)
    state = read_state_dict(path)
    assert all(torch.equal(state[k], ema[k]) for k in ema)


def test_build_matches_detected_info() -> None:
    for factory, info in CASES.values():
        _, state = _random_state(factory)
        arch, detected = archs.detect(state)
        assert detected == info and arch.name == info.arch
        assert set(archs.build(info).state_dict()) == set(state)
        assert set(arch.build(info).state_dict()) == set(state)


class _Payload:
    """A pickled object that would create a file if unpickling ran its reduce hook."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (str(self.marker), "w"))  # opening for writing creates the file


def test_pickle_that_is_not_weights_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    with path.open("wb") as fh:
        pickle.dump({"params_ema": _Payload(marker)}, fh, protocol=2)
    with pytest.raises(ModelLoadError, match=r"refused: the pickle references io\.open") as info:
        load_network(path)
    assert str(path) in info.value.message
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # proof that the payload is live: a plain unpickle runs it
    assert marker.exists()


def test_custom_class_saved_by_torch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "object.pth"
    torch.save(_Payload(tmp_path / "never.txt"), path)
    with pytest.raises(ModelLoadError, match=r"object\.pth"):
        read_state_dict(path)
    assert not (tmp_path / "never.txt").exists()


def test_unknown_architecture_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "esrgan_old.pth"
    torch.save({"model.0.weight": torch.zeros(64, 3, 3, 3), "model.0.bias": torch.zeros(64)}, path)
    with pytest.raises(ModelLoadError, match="not a known architecture") as info:
        load_network(path)
    assert str(path) in info.value.message


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.pt", "garbage.safetensors"])
def test_garbage_bytes_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 this is not a weight file \xff" * 10)
    with pytest.raises(ModelLoadError) as info:
        load_network(path)
    assert str(path) in info.value.message


def test_non_tensor_dict_and_wrong_suffix_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "config.pth"
    torch.save({"lr": 0.1, "epochs": 3}, bad)
    with pytest.raises(ModelLoadError, match="not a state dict"):
        read_state_dict(bad)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported"):
        read_state_dict(onnx)
    with pytest.raises(ModelLoadError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")


def test_shape_mismatch_is_a_load_error(tmp_path: Path) -> None:
    _, state = _random_state(CASES["rrdb_x4"][0])
    state["conv_hr.weight"] = torch.zeros(16, 16, 1, 1)  # right name, wrong kernel
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=r"broken\.safetensors.*do not fit RRDBNet"):
        load_network(path)


def test_missing_or_extra_keys_are_refused(tmp_path: Path) -> None:
    _, state = _random_state(CASES["srvgg_x4"][0])
    extra = dict(state, **{"body.3.extra": torch.zeros(1)})
    path = tmp_path / "extra.pth"
    torch.save(extra, path)
    with pytest.raises(ModelLoadError, match=r"extra\.pth"):
        load_network(path)
    _, rrdb = _random_state(CASES["rrdb_x4"][0])
    del rrdb["conv_up2.bias"]
    path = tmp_path / "missing.pth"
    torch.save(rrdb, path)
    with pytest.raises(ModelLoadError, match=r"missing\.pth"):
        load_network(path)


def test_non_rgb_models_are_refused() -> None:
    gray = RRDBNet(num_in_ch=1, num_out_ch=1, num_feat=8, num_block=1, num_grow_ch=4).state_dict()
    with pytest.raises(ModelLoadError, match="not an RGB model"):
        archs.detect(gray, source=Path("gray.pth"))


def test_srvgg_without_prelu_slopes_is_relu() -> None:
    state = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4, act_type="relu").state_dict()
    _, info = archs.detect(state)
    assert info.params["act_type"] == "relu"
    archs.build(info).load_state_dict(state, strict=True)

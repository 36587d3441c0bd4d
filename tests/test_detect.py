"""Detection from the state dict alone: every supported variant, in each key layout and wrapper.

Random-weight networks of every variant are saved the way trainers save them (BasicSR names or
ESRGAN's original ``model.N`` layout; ``params_ema``, ``params``, ``state_dict`` or bare; ``.pth`` or
``.safetensors``), then read back: the detected architecture, scale and hyper-parameters must be the
ones the network was built with, and the loaded module must compute what the original did.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from upscale_server.errors import ModelLoadError
from upscale_server.inference import archs
from upscale_server.inference.archs.base import ArchInfo
from upscale_server.inference.archs.rrdbnet import RRDBNet
from upscale_server.inference.archs.srvgg import SRVGGNetCompact
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.weights.loading import LoadedNetwork, load_network, read_state_dict


def rrdb(scale: int, *, feat: int = 8, blocks: int = 2, grow: int = 4, unshuffle: int | None = None) -> ArchInfo:
    params: dict[str, int | str] = {"num_block": blocks, "num_feat": feat, "num_grow_ch": grow}
    if unshuffle is not None:
        params["pixel_unshuffle"] = unshuffle
    return ArchInfo("RRDBNet", scale, params)


def srvgg(scale: int, *, feat: int = 8, convs: int = 3, act: str = "prelu") -> ArchInfo:
    return ArchInfo("SRVGGNetCompact", scale, {"num_feat": feat, "num_conv": convs, "act_type": act})


#: name: (info, layouts it is saved in)
VARIANTS: dict[str, tuple[ArchInfo, tuple[str, ...]]] = {
    "rrdb_x4": (rrdb(4, feat=16, blocks=3, grow=8), ("basicsr", "esrgan")),
    "rrdb_x8": (rrdb(8, blocks=1), ("basicsr", "esrgan")),
    "rrdb_x2_unshuffle": (rrdb(2, blocks=1), ("basicsr", "esrgan")),
    "rrdb_x1_unshuffle": (rrdb(1, blocks=1), ("basicsr", "esrgan")),
    "rrdb_x2_esrgan": (rrdb(2, blocks=2, unshuffle=1), ("basicsr", "esrgan")),
    "rrdb_x1_esrgan": (rrdb(1, blocks=1, feat=12, grow=6, unshuffle=1), ("basicsr", "esrgan")),
    "srvgg_x1": (srvgg(1, convs=1), ("basicsr",)),
    "srvgg_x2": (srvgg(2, feat=16, convs=4), ("basicsr",)),
    "srvgg_x3": (srvgg(3), ("basicsr",)),
    "srvgg_x4": (srvgg(4, convs=0), ("basicsr",)),
    "srvgg_x4_relu": (srvgg(4, act="relu"), ("basicsr",)),
}
CASES = [(name, layout) for name, (_, layouts) in VARIANTS.items() for layout in layouts]
WRAPPERS = ("params_ema", "params", "state_dict", "bare", "safetensors")

_BASICSR_BLOCK = re.compile(r"^body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)$")


def random_network(info: ArchInfo) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    net = archs.build(info).eval()
    with torch.no_grad():
        for p in net.parameters():  # beyond the default init, so a swapped tensor would show
            p.add_(torch.randn_like(p) * 0.05)
    return net, {k: v.clone() for k, v in net.state_dict().items()}


def esrgan_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BasicSR names -> ESRGAN's original ``model.N`` layout (what most community models use)."""
    stages = sum(1 for key in state if re.fullmatch(r"conv_up\d+\.weight", key))
    blocks = len({key.split(".")[1] for key in state if key.startswith("body.")})
    top = {"conv_first": 0, "conv_hr": 2 + 3 * stages, "conv_last": 4 + 3 * stages}
    top |= {f"conv_up{k}": 3 * k for k in range(1, stages + 1)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name, kind = key.rsplit(".", 1)
        if m := _BASICSR_BLOCK.match(key):
            block, rdb_index, conv, kind = m.groups()
            out[f"model.1.sub.{block}.RDB{rdb_index}.conv{conv}.0.{kind}"] = tensor
        elif name == "conv_body":
            out[f"model.1.sub.{blocks}.{kind}"] = tensor
        else:
            out[f"model.{top[name]}.{kind}"] = tensor
    return out


def save(state: dict[str, torch.Tensor], folder: Path, wrapper: str, stem: str = "model") -> Path:
    if wrapper == "safetensors":
        path = folder / f"{stem}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path
    path = folder / f"{stem}.pth"
    torch.save(state if wrapper == "bare" else {wrapper: state}, path)
    return path


@pytest.mark.parametrize(("variant", "layout"), CASES)
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_every_variant_is_detected_exactly_in_every_layout_and_wrapper(
    variant: str, layout: str, wrapper: str, tmp_path: Path
) -> None:
    info, _ = VARIANTS[variant]
    net, state = random_network(info)
    path = save(esrgan_layout(state) if layout == "esrgan" else state, tmp_path, wrapper)

    loaded = load_network(path)

    assert loaded.info == info
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        expected, got = net(x), loaded.module(x)
    assert got.shape == (1, 3, 8 * info.scale, 8 * info.scale)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("variant", ["rrdb_x8", "rrdb_x1_esrgan", "rrdb_x2_esrgan"])
def test_winograd_form_matches_the_direct_path_for_every_stage_count(variant: str) -> None:
    info, _ = VARIANTS[variant]
    net, _ = random_network(info)
    fast = archs.by_name(info.arch).winograd_form(net)
    assert fast is not None
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(fast(x), net(x), atol=1e-4)


def test_esrgan_layout_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    _, state = random_network(rrdb(4, blocks=1))
    old = esrgan_layout(state)
    old["model.1.sub.0.RDB1.conv1.1.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match=r"model\.pth: ESRGAN layout has an unexpected key model\.1\.sub\.0"):
        load_network(save(old, tmp_path, "bare"))


def test_esrgan_layout_with_pixel_shuffle_upsampling_is_refused(tmp_path: Path) -> None:
    _, state = random_network(rrdb(4, blocks=1))
    old = esrgan_layout(state)
    old["model.4.weight"] = old.pop("model.3.weight")  # convs where no stage of ours puts them
    old["model.4.bias"] = old.pop("model.3.bias")
    with pytest.raises(ModelLoadError, match="not a known RRDBNet"):
        load_network(save(old, tmp_path, "bare"))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s.pop("body.0.rdb2.conv3.bias"), "missing body.0.rdb2.conv3.bias$"),
        (lambda s: s.update({"extra.weight": torch.zeros(1)}), "unexpected extra.weight$"),
        (lambda s: s.update({"conv_hr.weight": torch.zeros(8, 8, 1, 1)}), r"conv_hr.weight has shape \(8, 8, 1, 1\)"),
    ],
)
def test_keys_must_match_strictly(
    mutate: Callable[[dict[str, torch.Tensor]], object], reason: str, tmp_path: Path
) -> None:
    _, state = random_network(rrdb(4, blocks=1))
    mutate(state)
    with pytest.raises(ModelLoadError, match=f"model.pth: weights do not fit RRDBNet: {reason}"):
        load_network(save(state, tmp_path, "bare"))


def test_srvgg_beyond_scale_4_is_refused(tmp_path: Path) -> None:
    state = SRVGGNetCompact(num_feat=4, num_conv=1, upscale=5).state_dict()
    with pytest.raises(ModelLoadError, match="scale 1 to 4"):
        load_network(save(state, tmp_path, "bare"))


def test_rrdb_with_too_many_stages_is_refused(tmp_path: Path) -> None:
    net = RRDBNet(scale=8, num_feat=4, num_block=1, num_grow_ch=2)
    state = net.state_dict()
    state["conv_up4.weight"], state["conv_up4.bias"] = state["conv_up3.weight"], state["conv_up3.bias"]
    with pytest.raises(ModelLoadError, match="4 upsampling stages after a pixel-unshuffle by 1"):
        load_network(save(state, tmp_path, "bare"))


@pytest.mark.slow
def test_official_x4plus_in_the_esrgan_layout_gives_the_official_output(
    load_real_network: Callable[[str], LoadedNetwork], photo_path: Path, tmp_path: Path
) -> None:
    """The real RealESRGAN_x4plus weights, rewritten into ESRGAN's original layout as community files
    are: detected as the same network, and the same picture comes out (within one level)."""
    torch.set_num_threads(2)
    official = load_real_network("runware:504@1")
    old = esrgan_layout(read_state_dict(official.path))
    assert "model.1.sub.23.weight" in old and "model.10.weight" in old
    path = tmp_path / "4x-RealESRGAN-old-layout.pth"
    torch.save(old, path)

    rewritten = load_network(path)
    assert rewritten.info == official.info

    with Image.open(photo_path) as image:
        crop = image.convert("RGB").crop((200, 180, 264, 228))
    x = np.ascontiguousarray(np.asarray(crop, dtype=np.float32) / 255.0)
    ours = Upscaler(rewritten, device=torch.device("cpu"), dtype=torch.float32).upscale(x)
    reference = Upscaler(official, device=torch.device("cpu"), dtype=torch.float32).upscale(x)
    assert ours.shape == reference.shape == (48 * 4, 64 * 4, 3)
    assert float(np.abs(ours - reference).max()) * 255 <= 1.0
    assert float(reference.std()) * 255 > 10.0  # not a flat picture

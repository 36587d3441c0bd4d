"""The plain-torch architectures (BasicSR names, sizes, behaviour) and their descriptors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upscale_server.inference import archs
from upscale_server.inference.archs.base import ArchInfo
from upscale_server.inference.archs.rrdbnet import DESCRIPTOR as RRDBNET
from upscale_server.inference.archs.rrdbnet import RRDBNet
from upscale_server.inference.archs.srvgg import DESCRIPTOR as SRVGG
from upscale_server.inference.archs.srvgg import SRVGGNetCompact


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_parameter_counts_match_the_official_models() -> None:
    with torch.device("meta"):
        assert _count(RRDBNet(num_block=23)) == 16_697_987  # RealESRGAN_x4plus
        assert _count(RRDBNet(num_block=6)) == 4_467_779  # RealESRGAN_x4plus_anime_6B
        assert _count(SRVGGNetCompact(num_conv=16, upscale=4)) == 621_424  # realesr-animevideov3


def test_rrdbnet_uses_basicsr_state_dict_names() -> None:
    names = set(RRDBNet(num_feat=8, num_block=2, num_grow_ch=4).state_dict())
    expected = {"conv_first", "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"}
    expected |= {f"body.{b}.rdb{r}.conv{c}" for b in range(2) for r in (1, 2, 3) for c in range(1, 6)}
    assert names == {f"{n}.{p}" for n in expected for p in ("weight", "bias")}


def test_srvgg_body_alternates_conv_and_activation() -> None:
    net = SRVGGNetCompact(num_feat=8, num_conv=3, upscale=4)
    kinds = [type(layer).__name__ for layer in net.body]
    assert kinds == ["Conv2d", "PReLU"] * 4 + ["Conv2d"]
    assert net.body[-1].out_channels == 3 * 4 * 4
    assert tuple(net.state_dict()["body.1.weight"].shape) == (8,)


@pytest.mark.parametrize(("scale", "in_ch"), [(4, 3), (2, 12), (1, 48)])
def test_rrdbnet_output_size_and_unshuffled_input(scale: int, in_ch: int) -> None:
    torch.manual_seed(0)
    net = RRDBNet(scale=scale, num_feat=8, num_block=1, num_grow_ch=4).eval()
    assert net.conv_first.in_channels == in_ch
    x = torch.rand(2, 3, 12, 16)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (2, 3, 12 * scale, 16 * scale)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("upscale", [1, 2, 3, 4])
def test_srvgg_output_size(upscale: int) -> None:
    net = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=upscale).eval()
    with torch.inference_mode():
        y = net(torch.rand(1, 3, 7, 5))
    assert y.shape == (1, 3, 7 * upscale, 5 * upscale)


def test_srvgg_adds_nearest_upsampled_input() -> None:
    # With a zero last conv the network's residual is zero: the output is exactly the nearest x4 input.
    net = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4).eval()
    last = net.body[-1]
    assert isinstance(last, torch.nn.Conv2d) and last.bias is not None
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    x = torch.rand(1, 3, 6, 9)
    with torch.inference_mode():
        y = net(x)
    assert torch.equal(y, F.interpolate(x, scale_factor=4, mode="nearest"))


def test_outputs_are_not_clamped() -> None:
    # A large last-conv bias pushes every value above 1: the module must pass it through.
    net = RRDBNet(num_feat=8, num_block=1, num_grow_ch=4).eval()
    assert net.conv_last.bias is not None
    with torch.no_grad():
        net.conv_last.bias.fill_(5.0)
        net.conv_last.weight.zero_()
    with torch.inference_mode():
        y = net(torch.rand(1, 3, 4, 4))
    assert torch.allclose(y, torch.full_like(y, 5.0))


def test_unknown_activation_and_scale_are_refused() -> None:
    with pytest.raises(ValueError, match="act_type"):
        SRVGGNetCompact(act_type="gelu")
    with pytest.raises(ValueError, match="scale"):
        RRDBNet(scale=3)
    with pytest.raises(ValueError, match="pixel-unshuffle by 3"):
        RRDBNet(scale=2, unshuffle=3)


# --------------------------------------------------------------------------- descriptors


def test_the_registry_knows_each_descriptor_by_name() -> None:
    assert archs.names() == ("RRDBNet", "SRVGGNetCompact")
    assert archs.ARCHITECTURES == (RRDBNET, SRVGG)
    assert archs.by_name("RRDBNet") is RRDBNET and archs.by_name("SRVGGNetCompact") is SRVGG
    with pytest.raises(ValueError, match=r"unknown architecture 'SwinIR' \(known: RRDBNet, SRVGGNetCompact\)"):
        archs.by_name("SwinIR")


def test_detection_names_the_descriptor() -> None:
    rrdb = RRDBNet(scale=2, num_feat=8, num_block=2, num_grow_ch=4).state_dict()
    srvgg = SRVGGNetCompact(num_feat=8, num_conv=3, upscale=3).state_dict()
    assert archs.detect(rrdb) == (RRDBNET, ArchInfo("RRDBNet", 2, {"num_block": 2, "num_feat": 8, "num_grow_ch": 4}))
    assert archs.detect(srvgg) == (
        SRVGG,
        ArchInfo("SRVGGNetCompact", 3, {"num_feat": 8, "num_conv": 3, "act_type": "prelu"}),
    )
    assert RRDBNET.claims(rrdb) and not SRVGG.claims(rrdb)
    assert SRVGG.claims(srvgg) and not RRDBNET.claims(srvgg)


def test_descriptors_build_their_modules_with_the_manifest_parameters() -> None:
    info = ArchInfo("RRDBNet", 1, {"num_block": 1, "num_feat": 8, "num_grow_ch": 4})
    built = RRDBNET.build(info)
    assert isinstance(built, RRDBNet) and built.scale == 1 and len(built.body) == 1
    assert RRDBNET.params == ("num_block", "num_feat", "num_grow_ch")
    assert SRVGG.params == ("num_feat", "num_conv", "act_type")
    relu = SRVGG.build(ArchInfo("SRVGGNetCompact", 2, {"num_feat": 4, "num_conv": 2, "act_type": "relu"}))
    assert isinstance(relu, SRVGGNetCompact) and relu.upscale == 2 and isinstance(relu.body[1], torch.nn.ReLU)


def test_descriptors_give_the_engine_what_it_plans_with() -> None:
    # Scale 2 and 1 unshuffle the input by 2 and 4; everything else takes any size.
    assert [RRDBNET.size_multiple(s) for s in (4, 2, 1)] == [1, 2, 4]
    assert [SRVGG.size_multiple(s) for s in (4, 2, 1)] == [1, 1, 1]
    assert RRDBNET.scales == (1, 2, 4, 8) and SRVGG.scales == (1, 2, 3, 4)
    assert (RRDBNET.default_tile_overlap, SRVGG.default_tile_overlap) == (64, 32)
    assert all(arch.supports_half and arch.supports_bf16 for arch in archs.ARCHITECTURES)
    # The memory model: RRDB peaks at output resolution, SRVGG at input resolution.
    assert RRDBNET.peak_values_per_input_pixel(4) == 3 * 64 * 16 + 1000
    assert SRVGG.peak_values_per_input_pixel(4) == 4 * 64 + 2 * 3 * 16 + 48


def test_ncnn_layouts_follow_the_official_graphs() -> None:
    rrdb = RRDBNET.ncnn_layout(ArchInfo("RRDBNet", 4, {"num_block": 2, "num_feat": 8, "num_grow_ch": 4}))
    assert len(rrdb.slots) == 1 + 2 * 15 + 5 and rrdb.pixel_shuffle is None
    assert {slot.kind for slot in rrdb.slots} == {"Convolution"}
    assert [s.prefix for s in rrdb.slots if s.leaky_slope == 0.2][:4] == [f"body.0.rdb1.conv{c}" for c in range(1, 5)]
    assert [s.prefix for s in rrdb.slots if s.leaky_slope is None][-2:] == ["conv_body", "conv_last"]
    info = ArchInfo("SRVGGNetCompact", 3, {"num_feat": 8, "num_conv": 1, "act_type": "prelu"})
    srvgg = SRVGG.ncnn_layout(info)
    assert [(s.prefix, s.kind) for s in srvgg.slots] == [
        ("body.0", "Convolution"),
        ("body.1", "PReLU"),
        ("body.2", "Convolution"),
        ("body.3", "PReLU"),
        ("body.4", "Convolution"),
    ]
    assert srvgg.pixel_shuffle == 3
    # Every slot names a tensor of the built module, so a conversion fills it exactly.
    for arch, layout, arch_info in (
        (SRVGG, srvgg, info),
        (RRDBNET, rrdb, ArchInfo("RRDBNet", 4, {"num_block": 2, "num_feat": 8, "num_grow_ch": 4})),
    ):
        names = {name.rsplit(".", 1)[0] for name in arch.build(arch_info).state_dict()}
        assert {slot.prefix for slot in layout.slots} == names

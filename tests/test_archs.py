"""The plain-torch architectures: BasicSR names, sizes, and the behaviour the docs promise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upscale_server.inference.archs import RRDBNet, SRVGGNetCompact


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

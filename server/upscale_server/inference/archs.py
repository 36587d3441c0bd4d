"""The two Real-ESRGAN network architectures, written in plain PyTorch.

Why our own copy: the reference implementations live in ``basicsr``/``realesrgan`` (and ``spandrel``),
which import torchvision and do not import on a CPU-only torch install. The modules here follow the
published architectures (ESRGAN's RRDB network, Real-ESRGAN's compact VGG-style network) and use
BasicSR's exact parameter names, so the official ``.pth`` files and our ncnn conversions load with
``load_state_dict(strict=True)``.

Both forwards take an NCHW float tensor with values in about [0, 1] and return NCHW at ``scale`` times
the size, **not clamped**: the caller clamps when it turns the result into pixels (the networks
overshoot slightly, and tiling blends before clamping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Residual scaling used throughout ESRGAN: each dense block and each RRDB adds 0.2 of its output
#: to its input. It keeps the very deep network stable; the weights were trained with it.
RESIDUAL_SCALE = 0.2
LRELU_SLOPE = 0.2

#: Input channel multiplier per RRDBNet scale: scale 2 and 1 fold pixels into channels first.
_UNSHUFFLE = {4: 1, 2: 2, 1: 4}


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output (dense connections)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.leaky_relu(self.conv1(x), LRELU_SLOPE)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), LRELU_SLOPE)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), LRELU_SLOPE)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), LRELU_SLOPE)
        x5: torch.Tensor = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks inside one more scaled residual."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN's generator as used by Real-ESRGAN (x4plus, x4plus_anime_6B, x2plus).

    The trunk always works at 1/4 of the output size and upsamples twice by 2 (nearest + conv). For
    ``scale`` 2 or 1 the input is pixel-unshuffled by 2 or 4 first (3 -> 12 or 48 channels), which is
    how RealESRGAN_x2plus reuses the x4 trunk; the same trick gives scale 1.
    """

    def __init__(
        self,
        *,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ) -> None:
        super().__init__()
        if scale not in _UNSHUFFLE:
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4, not {scale}")
        self.scale = scale
        self._unshuffle = _UNSHUFFLE[scale]
        self.conv_first = nn.Conv2d(num_in_ch * self._unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pixel-unshuffle needs sizes divisible by the factor; callers pad (tiling does it anyway).
        feat = F.pixel_unshuffle(x, self._unshuffle) if self._unshuffle > 1 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2.0, mode="nearest")), LRELU_SLOPE)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2.0, mode="nearest")), LRELU_SLOPE)
        out: torch.Tensor = self.conv_last(F.leaky_relu(self.conv_hr(feat), LRELU_SLOPE))
        return out


ACT_TYPES = ("prelu", "relu", "leakyrelu")


def _activation(act_type: str, num_feat: int) -> nn.Module:
    if act_type == "prelu":
        return nn.PReLU(num_parameters=num_feat)
    if act_type == "relu":
        return nn.ReLU(inplace=True)
    if act_type == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.1, inplace=True)
    raise ValueError(f"unknown act_type {act_type!r}; expected one of {', '.join(ACT_TYPES)}")


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network (realesr-animevideov3, realesr-general-x4v3).

    A plain stack of 3x3 convs at input resolution, a pixel shuffle to the output size, and the
    nearest-upsampled input added on top, so the convs only learn the residual. ``body`` is one
    ModuleList alternating conv and activation (``body.0`` conv, ``body.1`` activation, ...), ending
    with a conv to ``num_out_ch * upscale**2`` channels; the index layout is what the official
    weights are keyed by.
    """

    def __init__(
        self,
        *,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        upscale: int = 4,
        act_type: str = "prelu",
    ) -> None:
        super().__init__()
        self.upscale = upscale
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), _activation(act_type, num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), _activation(act_type, num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        # The convs predict only the residual over a nearest-neighbour enlargement of the input.
        base = F.interpolate(x, scale_factor=float(self.upscale), mode="nearest")
        result: torch.Tensor = self.upsampler(out) + base
        return result

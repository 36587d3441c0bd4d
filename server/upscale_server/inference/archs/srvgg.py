"""Real-ESRGAN's compact VGG-style network (realesr-animevideov3, realesr-general-x4v3): the module,
its Winograd form, and its descriptor.

Our own copy for the reason given in :mod:`~upscale_server.inference.archs.rrdbnet`, with BasicSR's
parameter names. The forward takes NCHW floats in about [0, 1] and returns NCHW at ``upscale`` times
the size, not clamped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from upscale_server.errors import ModelLoadError
from upscale_server.inference.archs.base import (
    RGB,
    ArchInfo,
    Architecture,
    NcnnLayout,
    NcnnSlot,
    int_param,
    tensor_shape,
)
from upscale_server.inference.cpu import winograd
from upscale_server.inference.cpu.winograd import WinogradConv, fused_activation, nchw, nhwc

ACT_TYPES: Final = ("prelu", "relu", "leakyrelu")
_SCALES: Final = (1, 2, 3, 4)
_LAYER_KEY: Final = re.compile(r"^body\.(\d+)\.weight$")


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


class WinogradSRVGGNet(nn.Module):
    """SRVGGNetCompact's forward with Winograd convolutions and fused activations."""

    def __init__(self, net: SRVGGNetCompact) -> None:
        super().__init__()
        self.net = net
        layers = list(net.body)
        self.convs = [WinogradConv.of(layer) for layer in layers[0::2] if isinstance(layer, nn.Conv2d)]
        self.acts = [fused_activation(layer) for layer in layers[1::2]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        out = nhwc(x.contiguous(memory_format=torch.channels_last))
        for layer, act in zip(self.convs[:-1], self.acts, strict=True):
            out = winograd.conv(out, layer, **act)
        res = net.upsampler(nchw(winograd.conv(out, self.convs[-1])))
        base = F.interpolate(x, scale_factor=float(net.upscale), mode="nearest")
        result: torch.Tensor = res + base
        return result


class SRVGGNetCompactArchitecture(Architecture):
    name = "SRVGGNetCompact"
    params = ("num_feat", "num_conv", "act_type")
    scales = _SCALES
    #: animevideov3 is exact from 18 pixels inward (its receptive radius); 32 leaves room for the
    #: quarter-overlap feather band.
    default_tile_overlap = 32

    def claims(self, state: Mapping[str, torch.Tensor]) -> bool:
        return "body.0.weight" in state and "conv_first.weight" not in state

    def detect(self, state: Mapping[str, torch.Tensor], where: str) -> ArchInfo:
        conv_idx = sorted(int(m.group(1)) for key, t in state.items() if (m := _LAYER_KEY.match(key)) and t.ndim == 4)
        # Convs sit at even indices 0, 2, ..., 2 * num_conv + 2; activations in between.
        if len(conv_idx) < 2 or conv_idx != list(range(0, 2 * len(conv_idx), 2)):
            raise ModelLoadError(f"{where}: SRVGGNetCompact body convs are not at body.0, body.2, ...")
        num_conv = len(conv_idx) - 2
        num_feat, in_ch, _, _ = tensor_shape(state, "body.0.weight", 4, where)
        last_out = tensor_shape(state, f"body.{conv_idx[-1]}.weight", 4, where)[0]
        upscale = round((last_out / RGB) ** 0.5)
        if in_ch != RGB or upscale not in _SCALES or RGB * upscale * upscale != last_out:
            raise ModelLoadError(
                f"{where}: SRVGGNetCompact with {in_ch} input channels and a last conv of {last_out} "
                "channels is not an RGB model of scale 1 to 4 (expected 3 in and 3 * scale^2 out)"
            )
        # Only PReLU has weights; ReLU and LeakyReLU leave no trace, and the official models never use
        # them, so a body without slopes is assumed to be ReLU (BasicSR's other parameter-free choice).
        act_type = "prelu" if "body.1.weight" in state else "relu"
        return ArchInfo(self.name, upscale, {"num_feat": num_feat, "num_conv": num_conv, "act_type": act_type})

    def build(self, info: ArchInfo) -> nn.Module:
        return SRVGGNetCompact(
            num_in_ch=RGB,
            num_out_ch=RGB,
            num_feat=int_param(info.params, "num_feat"),
            num_conv=int_param(info.params, "num_conv"),
            upscale=info.scale,
            act_type=str(info.params.get("act_type", "prelu")),
        )

    def peak_values_per_input_pixel(self, scale: int) -> int:
        """Everything stays at input resolution (a few 64-channel tensors) until the final pixel
        shuffle, whose input and output and the nearest-upsampled base are ``3 * scale**2`` each."""
        return 4 * 64 + 2 * 3 * scale * scale + 48

    def largest_activation_per_input_pixel(self, scale: int) -> int:
        """A 64-channel body feature map, or the ``3 * scale**2``-channel pixel-shuffle input."""
        return max(64, 3 * scale * scale)

    def ncnn_layout(self, info: ArchInfo) -> NcnnLayout:
        """Each body conv, followed by its PReLU (the only activation with weights), then the last
        conv; the ``PixelShuffle`` layer must be the model's scale."""
        num_conv = int_param(info.params, "num_conv")
        prelu = info.params.get("act_type", "prelu") == "prelu"
        slots = []
        for i in range(num_conv + 1):
            slots.append(NcnnSlot(f"body.{2 * i}", "Convolution"))
            if prelu:
                slots.append(NcnnSlot(f"body.{2 * i + 1}", "PReLU"))
        slots.append(NcnnSlot(f"body.{2 * num_conv + 2}", "Convolution"))
        return NcnnLayout(tuple(slots), pixel_shuffle=info.scale)

    def winograd_form(self, module: nn.Module) -> nn.Module | None:
        return WinogradSRVGGNet(module) if isinstance(module, SRVGGNetCompact) else None


DESCRIPTOR: Final = SRVGGNetCompactArchitecture()

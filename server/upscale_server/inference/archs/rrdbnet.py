"""ESRGAN's RRDB network (RealESRGAN_x4plus, x4plus_anime_6B, x2plus, and community ESRGAN models): the
module, its Winograd form, and its descriptor.

Why our own copy: the reference implementations live in ``basicsr``/``realesrgan`` (and ``spandrel``),
which import torchvision and do not import on a CPU-only torch install. The module follows the
published architecture and uses BasicSR's exact parameter names, so the official ``.pth`` files and
our ncnn conversions load with ``load_state_dict(strict=True)``.

The forward takes an NCHW float tensor with values in about [0, 1] and returns NCHW at ``scale`` times
the size, **not clamped**: the caller clamps when it turns the result into pixels (the network
overshoots slightly, and tiling blends before clamping).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
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
from upscale_server.inference.cpu.winograd import POSITIONS, WinogradConv, nchw, nhwc, nhwc_upsample2x

#: Residual scaling used throughout ESRGAN: each dense block and each RRDB adds 0.2 of its output
#: to its input. It keeps the very deep network stable; the weights were trained with it.
RESIDUAL_SCALE: Final = 0.2
LRELU_SLOPE: Final = 0.2

#: BasicSR's pixel-unshuffle factor per scale: scale 2 and 1 fold pixels into channels first, so the
#: trunk keeps two x2 upsampling stages (three at scale 8). A model with another factor (ESRGAN's own
#: x2 and x1 models unshuffle nothing and upsample once or never) records it as ``pixel_unshuffle``.
_UNSHUFFLE: Final = {8: 1, 4: 1, 2: 2, 1: 4}
_BLOCK_KEY: Final = re.compile(r"^body\.(\d+)\.rdb1\.conv1\.weight$")
_UP_KEY: Final = re.compile(r"^conv_up(\d+)\.weight$")
#: ESRGAN's original key layout: one ``model`` Sequential, the trunk inside ``model.1.sub``.
_OLD_BLOCK: Final = re.compile(r"^model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)$")
_OLD_TOP: Final = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_OLD_TRUNK_CONV: Final = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")


def upsample_stages(scale: int, unshuffle: int) -> int:
    """How many nearest-x2 + conv stages the trunk needs: ``2**stages == scale * unshuffle``."""
    stages = (scale * unshuffle).bit_length() - 1
    if stages < 0 or 2**stages != scale * unshuffle:
        raise ValueError(f"RRDBNet cannot make scale {scale} from a pixel-unshuffle by {unshuffle}")
    return stages


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

    The trunk upsamples by 2 (nearest + conv) once per stage: twice at scale 4, three times at scale 8.
    For ``scale`` 2 or 1 the input is pixel-unshuffled by 2 or 4 first (3 -> 12 or 48 channels), which
    is how RealESRGAN_x2plus reuses the x4 trunk; ``unshuffle`` overrides that (ESRGAN's own x2 and x1
    models unshuffle by 1 and have one stage or none). Stage ``k`` is ``conv_up{k}``.
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
        unshuffle: int | None = None,
    ) -> None:
        super().__init__()
        if scale not in _UNSHUFFLE:
            raise ValueError(f"RRDBNet supports scale 1, 2, 4 or 8, not {scale}")
        self.scale = scale
        self.unshuffle = _UNSHUFFLE[scale] if unshuffle is None else unshuffle
        self.stages = upsample_stages(scale, self.unshuffle)
        self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        for k in range(1, self.stages + 1):
            self.add_module(f"conv_up{k}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pixel-unshuffle needs sizes divisible by the factor; callers pad (tiling does it anyway).
        feat = F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.up_convs():
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2.0, mode="nearest")), LRELU_SLOPE)
        out: torch.Tensor = self.conv_last(F.leaky_relu(self.conv_hr(feat), LRELU_SLOPE))
        return out

    def up_convs(self) -> list[nn.Conv2d]:
        """``conv_up1`` .. ``conv_up{stages}``, in order."""
        return [getattr(self, f"conv_up{k}") for k in range(1, self.stages + 1)]


# --------------------------------------------------------------------------- Winograd form


class _DenseBlock:
    """ResidualDenseBlock in the Winograd domain: the dense concatenation is a slice of one buffer.

    Each new feature map is transformed once, straight into its channel slice, and every later conv
    reads the slice, where the direct path copies the growing tensor five times.
    """

    def __init__(self, block: ResidualDenseBlock) -> None:
        self.convs = [WinogradConv.of(getattr(block, f"conv{k}")) for k in range(1, 6)]
        self.feat = self.convs[0].cin
        self.grow = self.convs[0].cout
        self.width = self.convs[4].cin  # channels of the full concatenation

    def __call__(self, x: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
        """``x``: NHWC block input; returns the block output (a new tensor)."""
        v, grown = scratch.v, scratch.grown
        winograd.transform_input(x, v, 0)
        offset = self.feat
        for layer in self.convs[:4]:
            winograd.products(v[:, :, :offset], layer.u, scratch.m_grow)
            winograd.transform_output(scratch.m_grow, grown, layer.bias, slope=LRELU_SLOPE)
            winograd.transform_input(grown, v, offset)
            offset += self.grow
        last = self.convs[4]
        winograd.products(v, last.u, scratch.m_feat)
        return winograd.transform_output(
            scratch.m_feat, torch.empty_like(x), last.bias, scale=RESIDUAL_SCALE, residual=x
        )


@dataclass
class _Scratch:
    """Buffers one forward pass reuses across all dense blocks (allocated once per call)."""

    v: torch.Tensor  # [36, T, width]: the transformed concatenation
    m_grow: torch.Tensor  # [36, T, grow]: products of conv1-4
    m_feat: torch.Tensor  # [36, T, feat]: products of conv5
    grown: torch.Tensor  # NHWC [N, H, W, grow]: conv1-4 output before its transform

    @classmethod
    def for_input(cls, x: torch.Tensor, block: _DenseBlock) -> _Scratch:
        n, h, w, _ = x.shape
        t = winograd.tiles(n, h, w)
        return cls(
            v=x.new_empty(POSITIONS, t, block.width),
            m_grow=x.new_empty(POSITIONS, t, block.grow),
            m_feat=x.new_empty(POSITIONS, t, block.feat),
            grown=x.new_empty(n, h, w, block.grow),
        )


class WinogradRRDBNet(nn.Module):
    """RRDBNet's forward with Winograd convolutions; same inputs, outputs and weights (shared, read-only)."""

    def __init__(self, net: RRDBNet) -> None:
        super().__init__()
        self.net = net
        self.blocks = [[_DenseBlock(getattr(rrdb, f"rdb{k}")) for k in range(1, 4)] for rrdb in net.body]
        self.conv_body = WinogradConv.of(net.conv_body)
        self.conv_ups = [WinogradConv.of(conv) for conv in net.up_convs()]
        self.conv_hr = WinogradConv.of(net.conv_hr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        feat = F.pixel_unshuffle(x, net.unshuffle) if net.unshuffle > 1 else x
        feat = net.conv_first(feat.contiguous(memory_format=torch.channels_last))
        trunk = nhwc(feat)
        scratch = _Scratch.for_input(trunk, self.blocks[0][0])
        body = trunk
        for rrdb in self.blocks:
            inner = body
            for block in rrdb:
                inner = block(inner, scratch)
            body = torch.add(body, inner, alpha=RESIDUAL_SCALE)
        del scratch
        feat_nhwc = winograd.conv(body, self.conv_body, residual=trunk)
        up = feat_nhwc
        for conv in self.conv_ups:
            up = winograd.conv(nhwc_upsample2x(up), conv, slope=LRELU_SLOPE)
        up = winograd.conv(up, self.conv_hr, slope=LRELU_SLOPE)
        out: torch.Tensor = net.conv_last(nchw(up))
        return out


# --------------------------------------------------------------------------- descriptor


class RRDBNetArchitecture(Architecture):
    name = "RRDBNet"
    params = ("num_block", "num_feat", "num_grow_ch")
    scales = tuple(sorted(_UNSHUFFLE))
    #: Measured on x4plus (fp32 CPU, photo crops, max |window - untiled| on 0..255 at distance d from a
    #: window edge): 30 levels at d=16, 8.6 at 32, 3.5 at 48, 1.0 at 64; 350 stacked convs carry the
    #: zero padding far inward. With the quarter-overlap feather band a tiled result stays within 1
    #: level of the untiled one.
    default_tile_overlap = 64

    def claims(self, state: Mapping[str, torch.Tensor]) -> bool:
        return "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state

    def own_names(self, state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor] | None:
        """BasicSR's names as they are; ESRGAN's original layout (``model.0``, ``model.1.sub.N.RDBr``,
        used by most community models) renamed key by key. A key of the old layout that has no place
        in the network is refused rather than dropped."""
        if self.claims(state):
            return dict(state)
        if "model.0.weight" not in state or "model.1.sub.0.RDB1.conv1.0.weight" not in state:
            return None
        trunk = [int(m.group(1)) for key in state if (m := _OLD_TRUNK_CONV.match(key))]
        tops = sorted({int(m.group(1)) for key in state if (m := _OLD_TOP.match(key))} - {0})
        if len(set(trunk)) != 1 or len(tops) < 2:
            raise ModelLoadError(f"{where}: ESRGAN layout without its trunk conv or its last two convs")
        # After the trunk (model.1): one (upsample, conv, lrelu) triple per stage, then HR conv, lrelu, last conv.
        *ups, hr, last = tops
        stages = len(ups)
        if ups != [3 * k for k in range(1, stages + 1)] or (hr, last) != (2 + 3 * stages, 4 + 3 * stages):
            raise ModelLoadError(f"{where}: ESRGAN layout with convs at model.{tops} is not a known RRDBNet")
        names = {0: "conv_first", hr: "conv_hr", last: "conv_last"}
        names |= {3 * k: f"conv_up{k}" for k in range(1, stages + 1)}
        renamed: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if m := _OLD_BLOCK.match(key):
                block, rdb, conv, kind = m.groups()
                renamed[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = tensor
            elif m := _OLD_TRUNK_CONV.match(key):
                renamed[f"conv_body.{m.group(2)}"] = tensor
            elif m := _OLD_TOP.match(key):
                renamed[f"{names[int(m.group(1))]}.{m.group(2)}"] = tensor
            else:
                raise ModelLoadError(f"{where}: ESRGAN layout has an unexpected key {key}")
        return renamed

    def detect(self, state: Mapping[str, torch.Tensor], where: str) -> ArchInfo:
        num_feat, in_ch, _, _ = tensor_shape(state, "conv_first.weight", 4, where)
        blocks = {int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key))}
        num_block = len(blocks)
        if blocks != set(range(num_block)):
            raise ModelLoadError(f"{where}: RRDBNet body blocks are not numbered 0..{num_block - 1}")
        num_grow_ch = tensor_shape(state, "body.0.rdb1.conv1.weight", 4, where)[0]
        out_ch = tensor_shape(state, "conv_last.weight", 4, where)[0]
        ups = sorted(int(m.group(1)) for key in state if (m := _UP_KEY.match(key)))
        if ups != list(range(1, len(ups) + 1)):
            raise ModelLoadError(f"{where}: RRDBNet upsampling convs are not numbered conv_up1..conv_up{len(ups)}")
        # The first conv sees 3 channels, or 12 / 48 after a pixel-unshuffle by 2 / 4.
        unshuffle = {RGB * f * f: f for f in (1, 2, 4)}.get(in_ch)
        if unshuffle is None or out_ch != RGB:
            raise ModelLoadError(
                f"{where}: RRDBNet with {in_ch} input / {out_ch} output channels is not an RGB model "
                "(expected 3, 12 or 48 in and 3 out)"
            )
        scale, remainder = divmod(2 ** len(ups), unshuffle)
        if remainder or scale not in _UNSHUFFLE:
            raise ModelLoadError(
                f"{where}: RRDBNet with {len(ups)} upsampling stages after a pixel-unshuffle by {unshuffle} "
                f"makes no scale this server runs (1, 2, 4 or 8)"
            )
        params: dict[str, int | str] = {"num_block": num_block, "num_feat": num_feat, "num_grow_ch": num_grow_ch}
        if unshuffle != _UNSHUFFLE[scale]:
            params["pixel_unshuffle"] = unshuffle  # only where it differs from BasicSR's, so manifests need not say it
        return ArchInfo(self.name, scale, params)

    def build(self, info: ArchInfo) -> nn.Module:
        unshuffle = info.params.get("pixel_unshuffle")
        return RRDBNet(
            num_in_ch=RGB,
            num_out_ch=RGB,
            scale=info.scale,
            num_feat=int_param(info.params, "num_feat"),
            num_block=int_param(info.params, "num_block"),
            num_grow_ch=int_param(info.params, "num_grow_ch"),
            unshuffle=None if unshuffle is None else int_param(info.params, "pixel_unshuffle"),
        )

    def size_multiple(self, scale: int) -> int:
        """Scale 2 and 1 pixel-unshuffle the input by 2 and 4 (in BasicSR's layout): its sides must
        divide by that. A model that unshuffles less only pads a few pixels it did not need."""
        return _UNSHUFFLE.get(scale, 1)

    def peak_values_per_input_pixel(self, scale: int) -> int:
        """The peak is at output resolution: about three live 64-channel tensors per output pixel
        (upsampled features, conv output, the next conv's output), i.e. ``3 * 64 * scale**2`` values
        per input pixel, plus about 1000 values at input resolution for the dense blocks'
        concatenations (600 direct; the Winograd form keeps the concatenation transformed, 2.25x larger)."""
        return 3 * 64 * scale * scale + 1000

    def largest_activation_per_input_pixel(self, scale: int) -> int:
        """A 64-channel feature map at output resolution, or a dense block's 192-channel
        concatenation at body resolution (the input's, or smaller after pixel-unshuffle)."""
        return max(64 * scale * scale, 192)

    def ncnn_layout(self, info: ArchInfo) -> NcnnLayout:
        """conv_first, the body's 15 convs per RRDB (leaky ReLU fused into conv1-4 of each dense
        block), conv_body, the two upsampling convs and conv_hr (leaky ReLU fused), conv_last. The
        nearest-neighbour upsampling is an ``Interp`` layer without weights."""
        slots = [NcnnSlot("conv_first", "Convolution")]
        for b in range(int_param(info.params, "num_block")):
            for r in (1, 2, 3):
                for c in range(1, 6):
                    slope = LRELU_SLOPE if c < 5 else None
                    slots.append(NcnnSlot(f"body.{b}.rdb{r}.conv{c}", "Convolution", slope))
        slots.append(NcnnSlot("conv_body", "Convolution"))
        unshuffle = info.params.get("pixel_unshuffle")
        stages = upsample_stages(info.scale, _UNSHUFFLE[info.scale] if unshuffle is None else int(unshuffle))
        ups = [f"conv_up{k}" for k in range(1, stages + 1)]
        slots += [NcnnSlot(name, "Convolution", LRELU_SLOPE) for name in (*ups, "conv_hr")]
        slots.append(NcnnSlot("conv_last", "Convolution"))
        return NcnnLayout(tuple(slots))

    def winograd_form(self, module: nn.Module) -> nn.Module | None:
        return WinogradRRDBNet(module) if isinstance(module, RRDBNet) else None


DESCRIPTOR: Final = RRDBNetArchitecture()

"""Winograd F(4x4, 3x3) convolutions for the CPU exact mode.

Why: on the CPU, oneDNN runs 3x3 convolutions directly (9 multiply-adds per tap per pixel), near the
cores' FMA peak; the ncnn runtime beats that with Winograd, which needs 4x fewer multiplications.
Real-ESRGAN's networks are almost entirely 3x3 stride-1 convolutions, so we do the same:

* weights are transformed once (``U = G g G^T``, in float64, kept as ``[36, Cin, Cout]``);
* inputs are gathered into 6x6 patches and transformed by a small C kernel (``winograd.c``), the
  36 products are batched GEMMs in torch (MKL), and the inverse transform, bias, activation and
  residual are fused in the same C kernel's second loop;
* the transformed domain is exposed (:func:`transform_input`, :func:`products`,
  :func:`transform_output`) for forms that keep data there, like RRDB's dense blocks
  (:mod:`upscale_server.inference.archs.rrdbnet`).

Each architecture builds its Winograd form on these primitives (``Architecture.winograd_form``).

F(4x4, 3x3) in float32 differs from a direct convolution by about 1e-6 relative per layer; through
x4plus's 350 layers that stays below 0.01 levels on the 0..255 scale (the engine's fidelity tests
hold it to ncnn within 1 level max, 0.01 mean).

The C kernel is built at install time and loaded by :mod:`upscale_server.inference.cpu.kernel`; where
it cannot be had, ``kernel.available()`` is False and the engine keeps oneDNN's direct path. A kernel
allocation that fails raises MemoryError ("out of memory"), which the engine answers with smaller
tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypedDict

import torch
from torch import nn

from upscale_server.inference.cpu import kernel

#: Transformed positions per tile: 6x6 for F(4x4, 3x3).
POSITIONS: Final = 36

_G: Final = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[Cout, Cin, 3, 3]`` -> ``[36, Cin, Cout]`` float32 (``G g G^T``, computed in float64)."""
    cout, cin = weight.shape[:2]
    u = _G @ weight.detach().double().cpu() @ _G.T  # [Cout, Cin, 6, 6]
    return u.permute(2, 3, 1, 0).reshape(POSITIONS, cin, cout).float().contiguous()


def tiles(n: int, h: int, w: int) -> int:
    return n * ((h + 3) // 4) * ((w + 3) // 4)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check_layout(transformed: torch.Tensor, *spatial: torch.Tensor | None) -> None:
    """The kernel reads raw pointers: every operand must be contiguous float32 on the CPU."""
    for t in (transformed, *spatial):
        if t is not None and not (t.is_contiguous() and t.dtype == torch.float32 and t.device.type == "cpu"):
            raise ValueError(f"Winograd operands must be contiguous CPU float32, got {t.dtype} {tuple(t.stride())}")


@dataclass(frozen=True)
class WinogradConv:
    """A prepared 3x3 stride-1 padding-1 convolution."""

    u: torch.Tensor  # [36, Cin, Cout]
    bias: torch.Tensor | None  # [Cout]

    @classmethod
    def of(cls, conv: nn.Conv2d) -> WinogradConv:
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
            raise ValueError("only 3x3 stride-1 padding-1 convolutions have a Winograd form here")
        bias = None if conv.bias is None else conv.bias.detach().float().contiguous()
        return cls(transform_weight(conv.weight), bias)

    @property
    def cin(self) -> int:
        return int(self.u.shape[1])

    @property
    def cout(self) -> int:
        return int(self.u.shape[2])


def transform_input(x: torch.Tensor, v: torch.Tensor, offset: int) -> None:
    """Transform NHWC ``x`` into the channels ``v[:, :, offset:offset + C]`` (``v`` is ``[36, T, ldc]``)."""
    n, h, w, c = x.shape
    _check_layout(v, x)
    status = kernel.load().wino_input(_ptr(x), n, h, w, c, c, 0, _ptr(v), v.shape[2], offset, torch.get_num_threads())
    kernel.check(status, "wino_input")


def transform_output(
    m: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    slope: float | None = None,
    slopes: torch.Tensor | None = None,
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = act(A^T m A + bias) * scale + residual`` into NHWC ``out``; act is leaky ReLU/PReLU or none."""
    n, h, w, c = out.shape
    _check_layout(m, out, residual)
    activate = slope is not None or slopes is not None
    status = kernel.load().wino_output(
        _ptr(m),
        m.shape[2],
        0,
        n,
        h,
        w,
        c,
        None if bias is None else _ptr(bias),
        int(activate),
        0.0 if slope is None else slope,
        None if slopes is None else _ptr(slopes),
        scale,
        None if residual is None else _ptr(residual),
        0 if residual is None else residual.shape[3],
        0,
        _ptr(out),
        c,
        0,
        torch.get_num_threads(),  # OpenMP's own default is per thread; follow torch's (UPSCALE_THREADS)
    )
    kernel.check(status, "wino_output")
    return out


def products(v: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[p] = v[p] @ u[p]`` for the 36 positions: the kernel's AVX2/AVX-512 GEMM where it applies, else
    ``torch.bmm``. ``v`` may be a channel slice ``[36, T, :K]`` of a wider contiguous buffer."""
    if v.shape[0] != POSITIONS or not (
        v.stride(2) == 1 and v.stride(0) == v.shape[1] * v.stride(1) and u.is_contiguous() and out.is_contiguous()
    ):
        raise ValueError("products() needs row-major operands (v may be a channel slice of a buffer)")
    _, t, k = v.shape
    n = u.shape[2]
    status = kernel.load().wino_gemm(_ptr(v), v.stride(1), _ptr(u), k, n, _ptr(out), n, t, torch.get_num_threads())
    if kernel.check(status, "wino_gemm") == kernel.WINO_DECLINED:
        torch.bmm(v, u, out=out)
    return out


#: Largest transformed buffer (bytes) a single :func:`conv` allocates; taller inputs run in bands of
#: rows. Keeps the high-resolution layers of x4plus (1024x1024x64 for a 256x256 input) from needing
#: 2.25x their activation size twice over, and keeps each band's buffers near the caches.
BAND_BYTES: Final = 32 * 2**20


def conv(
    x: torch.Tensor,
    layer: WinogradConv,
    *,
    slope: float | None = None,
    slopes: torch.Tensor | None = None,
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Winograd convolution of NHWC ``x``, with the layer's activation and residual fused in.

    Inputs whose transformed form exceeds :data:`BAND_BYTES` are done in bands of whole tile rows,
    each read with one row of real context above and below (a band's own zero padding lands only in
    the context rows, which are dropped).
    """
    n, h, w, _ = x.shape
    out = x.new_empty(n, h, w, layer.cout)
    per_tile_row = n * ((w + 3) // 4) * POSITIONS * max(layer.cin, layer.cout) * 4
    band = max(4, BAND_BYTES // max(per_tile_row, 1) * 4)
    if band >= h:
        return _conv_whole(x, layer, out, slope=slope, slopes=slopes, scale=scale, residual=residual)
    for top in range(0, h, band):
        bottom = min(top + band, h)
        lo, hi = max(top - 1, 0), min(bottom + 1, h)
        part = x.new_empty(n, hi - lo, w, layer.cout)
        part = _conv_whole(x[:, lo:hi].contiguous(), layer, part, slope=slope, slopes=slopes, scale=scale)
        rows = part[:, top - lo : top - lo + bottom - top]
        if residual is not None:
            rows = rows + residual[:, top:bottom]
        out[:, top:bottom] = rows
    return out


def _conv_whole(
    x: torch.Tensor,
    layer: WinogradConv,
    out: torch.Tensor,
    *,
    slope: float | None,
    slopes: torch.Tensor | None,
    scale: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    n, h, w, _ = x.shape
    v = x.new_empty(POSITIONS, tiles(n, h, w), layer.cin)
    transform_input(x, v, 0)
    m = products(v, layer.u, x.new_empty(POSITIONS, v.shape[1], layer.cout))
    del v
    return transform_output(m, out, layer.bias, slope=slope, slopes=slopes, scale=scale, residual=residual)


class FusedActivation(TypedDict, total=False):
    """The activation arguments of :func:`conv` for one activation layer."""

    slope: float
    slopes: torch.Tensor


def fused_activation(layer: nn.Module) -> FusedActivation:
    """How :func:`conv` applies ``layer`` (PReLU, LeakyReLU or ReLU) inside its output transform."""
    if isinstance(layer, nn.PReLU):
        return {"slopes": layer.weight.detach().float().contiguous()}
    if isinstance(layer, nn.LeakyReLU):
        return {"slope": float(layer.negative_slope)}
    if isinstance(layer, nn.ReLU):
        return {"slope": 0.0}
    raise ValueError(f"no fused form for activation {type(layer).__name__}")


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """NCHW channels_last -> its NHWC view (contiguous, no copy)."""
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """NHWC contiguous -> the NCHW channels_last view of it (no copy)."""
    return x.permute(0, 3, 1, 2)


def nhwc_upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest x2 upsampling of NHWC ``x`` (what ``F.interpolate(..., 2, "nearest")`` does)."""
    n, h, w, c = x.shape
    return x[:, :, None, :, None, :].expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c)

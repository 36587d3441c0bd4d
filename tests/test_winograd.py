"""Winograd F(4x4, 3x3) convolutions: equal to torch's direct convolution, on toy and real networks.

The kernel is the one built when the package was installed (tests/conftest.py); the fidelity tests run
once per variant this CPU can run (``each_variant``); tests/test_kernel.py covers building and loading."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from upscale_server.inference.archs.base import ArchInfo
from upscale_server.inference.archs.rrdbnet import DESCRIPTOR as RRDBNET
from upscale_server.inference.archs.rrdbnet import RRDBNet, WinogradRRDBNet
from upscale_server.inference.archs.srvgg import DESCRIPTOR as SRVGG
from upscale_server.inference.archs.srvgg import SRVGGNetCompact, WinogradSRVGGNet
from upscale_server.inference.cpu import kernel, variants, winograd
from upscale_server.inference.weights.loading import LoadedNetwork


def _runnable_variants() -> list[str]:
    flags = kernel.cpu_flags()
    return [v.name for v in variants.buildable() if v.cpu_flags <= flags and kernel.library_path(v).is_file()]


@pytest.fixture(params=_runnable_variants())
def each_variant(request: pytest.FixtureRequest) -> Iterator[str]:
    """The test runs with each built variant this CPU can run in turn; the default is restored after."""
    default = kernel.variant()
    kernel.load(variant=request.param)
    yield request.param
    if default is not None:
        kernel.load(variant=default)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def _direct(x_nhwc: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    with torch.inference_mode():
        return _nhwc(conv(x_nhwc.permute(0, 3, 1, 2)))


@pytest.mark.usefixtures("each_variant")
@pytest.mark.parametrize(
    ("n", "h", "w", "cin", "cout"),
    # x4plus's widths too (64 -> 32, 35 -> 64): the AVX-512 GEMM's 32-column blocks and 16-channel blocks.
    [(1, 16, 16, 8, 8), (2, 13, 7, 5, 12), (1, 1, 1, 3, 4), (1, 10, 9, 64, 32), (1, 7, 13, 35, 64)],
)
def test_conv_equals_direct_convolution(n: int, h: int, w: int, cin: int, cout: int) -> None:
    # Sides that are not multiples of 4 and channel counts that are not multiples of 8 exercise
    # the kernel's partial tiles and partial channel blocks.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, 3, 1, 1)
    x = torch.randn(n, h, w, cin)
    got = winograd.conv(x, winograd.WinogradConv.of(conv))
    assert got.shape == (n, h, w, cout)
    torch.testing.assert_close(got, _direct(x, conv), rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("each_variant")
def test_fused_activation_scale_and_residual() -> None:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(6, 6, 3, 1, 1)
    x = torch.randn(1, 9, 11, 6)
    residual = torch.randn(1, 9, 11, 6)
    layer = winograd.WinogradConv.of(conv)
    direct = _direct(x, conv)

    leaky = winograd.conv(x, layer, slope=0.2, scale=0.5, residual=residual)
    torch.testing.assert_close(leaky, F.leaky_relu(direct, 0.2) * 0.5 + residual, rtol=1e-4, atol=1e-4)

    slopes = torch.linspace(0.0, 0.5, 6)
    prelu = winograd.conv(x, layer, slopes=slopes)
    torch.testing.assert_close(prelu, torch.where(direct >= 0, direct, direct * slopes), rtol=1e-4, atol=1e-4)


def test_weight_transform_shape_and_refusals() -> None:
    assert winograd.transform_weight(torch.zeros(5, 7, 3, 3)).shape == (36, 7, 5)
    with pytest.raises(ValueError, match="3x3 stride-1"):
        winograd.WinogradConv.of(torch.nn.Conv2d(4, 4, 3, 2, 1))
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        layer = winograd.WinogradConv.of(torch.nn.Conv2d(4, 4, 3, 1, 1))
        winograd.conv(torch.zeros(1, 8, 8, 4).transpose(1, 2), layer)


@pytest.mark.usefixtures("each_variant")
@pytest.mark.parametrize("scale", [4, 2, 1])
def test_rrdbnet_forward_equals_the_module(scale: int) -> None:
    torch.manual_seed(2)
    net = RRDBNet(scale=scale, num_feat=16, num_block=2, num_grow_ch=8).eval()
    fast = RRDBNET.winograd_form(net)
    assert isinstance(fast, WinogradRRDBNet)
    x = torch.rand(2, 3, 12, 20)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("each_variant")
@pytest.mark.parametrize("act_type", ["prelu", "leakyrelu", "relu"])
def test_srvgg_forward_equals_the_module(act_type: str) -> None:
    torch.manual_seed(3)
    net = SRVGGNetCompact(num_feat=16, num_conv=3, upscale=4, act_type=act_type).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.PReLU):
                module.weight.uniform_(0.0, 0.3)  # distinct per-channel slopes
    fast = SRVGG.winograd_form(net)
    assert isinstance(fast, WinogradSRVGGNet)
    x = torch.rand(1, 3, 10, 9)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-4)


def test_other_modules_have_no_winograd_form() -> None:
    conv = torch.nn.Conv2d(3, 3, 3, 1, 1)
    assert RRDBNET.winograd_form(conv) is None and SRVGG.winograd_form(conv) is None
    # Each descriptor forms only its own architecture's modules.
    assert RRDBNET.winograd_form(SRVGGNetCompact(num_feat=4, num_conv=1)) is None
    assert SRVGG.winograd_form(RRDBNet(num_feat=8, num_block=1, num_grow_ch=4)) is None


@pytest.mark.slow
@pytest.mark.usefixtures("each_variant")
@pytest.mark.parametrize("model_id", ["runware:504@1", "local:realesr-animevideov3@1"])
def test_real_weights_match_the_direct_path(
    model_id: str, photo_path: Path, load_real_network: Callable[[str], LoadedNetwork]
) -> None:
    # Exact mode's promise: within 1 level max and 0.01 mean (0..255) of fp32 direct convolution.
    network = load_real_network(model_id)
    net = network.module.eval()
    fast = network.arch.winograd_form(net)
    assert fast is not None
    image = Image.open(photo_path).convert("RGB").resize((48, 40))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        diff = (fast(x).clamp(0, 1) - net(x).clamp(0, 1)).abs() * 255
    assert float(diff.max()) < 1.0
    assert float(diff.mean()) < 0.01


def test_tall_inputs_run_in_bands_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(8, 8, 3, 1, 1)
    layer = winograd.WinogradConv.of(conv)
    x = torch.randn(2, 37, 10, 8)
    residual = torch.randn(2, 37, 10, 8)
    whole = winograd.conv(x, layer, slope=0.2, residual=residual)
    calls: list[int] = []
    real = winograd._conv_whole
    monkeypatch.setattr(winograd, "BAND_BYTES", 2 * 3 * 36 * 8 * 4 * 2)  # two tile rows per band
    monkeypatch.setattr(winograd, "_conv_whole", lambda x, *a, **k: calls.append(x.shape[1]) or real(x, *a, **k))
    banded = winograd.conv(x, layer, slope=0.2, residual=residual)
    assert len(calls) == 5 and max(calls) <= 10  # 8-row bands plus a context row on each side
    torch.testing.assert_close(banded, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(banded, F.leaky_relu(_direct(x, conv), 0.2) + residual, rtol=1e-4, atol=1e-4)


def _toy_network() -> LoadedNetwork:
    torch.manual_seed(5)
    net = RRDBNet(num_feat=8, num_block=1, num_grow_ch=4).eval()
    info = ArchInfo(arch="RRDBNet", scale=4, params={})
    return LoadedNetwork(module=net, arch=RRDBNET, info=info, path=Path("toy.pth"))


@pytest.mark.parametrize(("convolution", "expected"), [("auto", WinogradRRDBNet), ("direct", RRDBNet)])
def test_engine_runs_cpu_exact_mode_with_the_chosen_convolution(convolution: str, expected: type) -> None:
    from upscale_server.inference.engine.upscaler import Upscaler

    network = _toy_network()
    reference = Upscaler(_toy_network(), device=torch.device("cpu"), dtype=torch.float32, convolution="direct")
    engine = Upscaler(network, device=torch.device("cpu"), dtype=torch.float32, convolution=convolution)
    assert isinstance(engine._cpu_runner(engine.cpu_choice(9, 11).method), expected)
    image = np.random.default_rng(0).random((9, 11, 3), dtype=np.float32)
    np.testing.assert_allclose(engine.upscale(image), reference.upscale(image), atol=1e-4)


def test_engine_refuses_unknown_or_unavailable_convolutions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from upscale_server.inference.engine.upscaler import Upscaler

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="convolution must be one of auto, winograd, direct"):
        Upscaler(_toy_network(), device=cpu, dtype=torch.float32, convolution="fft")
    monkeypatch.setattr(kernel, "_kernel", kernel._KernelState())
    monkeypatch.setattr(kernel, "BUILT_DIR", tmp_path)  # as if installed without a C compiler
    with pytest.raises(ValueError, match="Winograd convolutions are not available"):
        Upscaler(_toy_network(), device=cpu, dtype=torch.float32, convolution="winograd")
    fallback = Upscaler(_toy_network(), device=cpu, dtype=torch.float32, convolution="auto")
    assert fallback.cpu_methods == ("direct",)
    assert isinstance(fallback._cpu_runner("direct"), RRDBNet)


@pytest.mark.usefixtures("each_variant")
@pytest.mark.parametrize(("t", "k", "n"), [(7, 20, 32), (64, 64, 48), (13, 5, 12)])
def test_products_equal_batched_matmul_on_channel_slices(t: int, k: int, n: int) -> None:
    # n = 12 is not a multiple of 16: the kernel declines and torch.bmm answers.
    torch.manual_seed(6)
    buffer = torch.randn(36, t, k + 9)
    u = torch.randn(36, k, n)
    out = winograd.products(buffer[:, :, :k], u, torch.empty(36, t, n))
    torch.testing.assert_close(out, torch.bmm(buffer[:, :, :k], u), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="row-major"):
        winograd.products(buffer.transpose(1, 2)[:, :k], u, torch.empty(36, t + 9, n))

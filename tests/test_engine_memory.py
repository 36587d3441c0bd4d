"""Engine output at the requested size (per-window resize), device-side 8-bit quantisation,
torch.compile and its fallback, and the CUDA upload path (on a GPU only)."""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_engine import CPU, TinyNet, Unshuffle2, _levels, _photo_crop, image, network, untiled
from upscale_server.imaging import Picture, encode_image, resize_pixels
from upscale_server.inference.archs.srvgg import DESCRIPTOR as SRVGG
from upscale_server.inference.archs.srvgg import SRVGGNetCompact
from upscale_server.inference.engine import upscaler as engine_module
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.weights.loading import LoadedNetwork


def whole_then_resized(module: nn.Module, rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """The reference: the untiled native output, clamped, Lanczos-resized as one image."""
    return resize_pixels(untiled(module, rgb), width, height)


# --------------------------------------------------------------------------- out_size


@pytest.mark.parametrize(("scale", "factor"), [(4, 2), (4, 3), (2, 3), (2, 4), (4, 1)])
@pytest.mark.parametrize(("h", "w"), [(37, 53), (64, 20), (9, 70)])
def test_per_window_resize_equals_resizing_the_whole_output(scale: int, factor: int, h: int, w: int) -> None:
    net = TinyNet(scale, seed=7)
    rgb = image(h, w, seed=3)
    up = Upscaler(network(net, scale), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=8)
    got = up.upscale(rgb, out_size=(w * factor, h * factor))
    assert got.shape == (h * factor, w * factor, 3) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, whole_then_resized(net, rgb, w * factor, h * factor), atol=1e-5)


def test_the_native_canvas_is_never_allocated() -> None:
    """x4 network, factor 2: host memory stays far below the 4x output (here 12.6 MB)."""
    up = Upscaler(network(TinyNet(4), 4), device=CPU, dtype=torch.float32, tile_size=64, tile_overlap=8)
    rgb = image(512, 512, seed=1)
    native_bytes = 512 * 4 * 512 * 4 * 3 * 4
    tracemalloc.start()
    try:
        out = up.upscale(rgb, out_size=(1024, 1024))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (1024, 1024, 3)
    assert peak < native_bytes / 2  # the 1024 x 1024 output (12.6 MB / 4) plus one window's temporaries


def test_other_sizes_resize_the_whole_native_output() -> None:
    net = TinyNet(4, seed=2)
    rgb = image(30, 41)
    up = Upscaler(network(net, 4), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=8)
    np.testing.assert_allclose(up.upscale(rgb, out_size=(100, 77)), whole_then_resized(net, rgb, 100, 77), atol=2e-6)
    with pytest.raises(ValueError, match="positive"):
        up.upscale(rgb, out_size=(0, 10))
    # Context too narrow for the filter beyond the blend band: the whole native output is resized too.
    narrow = Upscaler(network(net, 4), device=CPU, dtype=torch.float32, tile_size=8, tile_overlap=2)
    np.testing.assert_array_equal(narrow.upscale(rgb, out_size=(82, 60)), resize_pixels(narrow.upscale(rgb), 82, 60))


def test_padded_unshuffle_models_resize_the_cropped_output() -> None:
    net = Unshuffle2()
    up = Upscaler(network(net, 2, arch="RRDBNet"), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=6)
    rgb = image(31, 45, seed=2)
    native = up.upscale(rgb)
    np.testing.assert_allclose(up.upscale(rgb, out_size=(90, 62)), resize_pixels(native, 90, 62), atol=2e-6)
    even = image(40, 46, seed=4)  # no padding: per-window, on the unshuffle grid
    np.testing.assert_allclose(
        up.upscale(even, out_size=(138, 120)), resize_pixels(up.upscale(even), 138, 120), atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("factor", [2, 3])
def test_real_animevideov3_per_window_resize_matches_resizing_the_whole(
    factor: int, load_real_network: Callable[[str], LoadedNetwork]
) -> None:
    """realesr-animevideov3, fp32 CPU, many small tiles: resizing window by window gives what
    "upscale untiled, then resize the whole image" gives, within 1 level (mean < 0.05 levels)."""
    rgb = _photo_crop(60, 100, 75, 100)
    net = load_real_network("local:realesr-animevideov3@1")
    whole = resize_pixels(Upscaler(net, device=CPU, dtype=torch.float32).upscale(rgb), 100 * factor, 75 * factor)
    tiles: list[int] = []
    up = Upscaler(net, device=CPU, dtype=torch.float32, tile_size=8)
    assert up.tile_overlap == SRVGG.default_tile_overlap
    got = up.upscale(rgb, out_size=(100 * factor, 75 * factor), progress=lambda done, total: tiles.append(total))
    assert tiles[-1] > 4
    assert got.shape == whole.shape == (75 * factor, 100 * factor, 3)
    assert _levels(got, whole) <= 1.0
    assert float(np.abs(got - whole).mean()) * 255 < 0.05


# --------------------------------------------------------------------------- 8-bit on the device


class HalfLevels(nn.Module):
    """x2 nearest upsample of a fixed pattern: exact half levels, values beyond [0, 1] and noise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2] * 2, x.shape[3] * 2
        k = torch.arange(h * w * 3, dtype=torch.float32).reshape(1, 3, h, w) % 256
        halves = (k + 0.5) / 255  # exactly between two levels: rounds half up on the host
        pattern = torch.where(k % 7 == 0, k / 100 - 1.2, halves)  # some far below 0 or above 1
        return pattern + torch.nn.functional.interpolate(x, scale_factor=2.0) * 1e-7


@pytest.mark.parametrize("module", [TinyNet(2, seed=9), TinyNet(2, bias=0.6), HalfLevels()])
def test_device_quantisation_gives_the_pixels_host_quantisation_gives(module: nn.Module) -> None:
    rgb = image(33, 47, seed=5)
    up = Upscaler(network(module, 2), device=CPU, dtype=torch.float32)
    float_out = up.upscale(rgb)
    quantised = up.upscale(rgb, quantize_8bit=True)
    assert quantised.dtype == np.float32 and quantised.shape == float_out.shape
    levels = quantised * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # k / 255 values
    assert not np.array_equal(quantised, float_out)
    # What gets stored is identical: the encoder quantises both to the same bytes.
    assert encode_image(Picture(quantised), "PNG") == encode_image(Picture(float_out), "PNG")
    assert encode_image(Picture(quantised), "WEBP", quality=100) == encode_image(
        Picture(float_out), "WEBP", quality=100
    )


def test_tiled_or_resized_results_are_not_quantised() -> None:
    net = TinyNet(4, seed=1)
    rgb = image(40, 40)
    tiled = Upscaler(network(net, 4), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=4)
    np.testing.assert_array_equal(tiled.upscale(rgb, quantize_8bit=True), tiled.upscale(rgb))
    whole = Upscaler(network(net, 4), device=CPU, dtype=torch.float32)
    resized = whole.upscale(rgb, out_size=(80, 80), quantize_8bit=True)
    np.testing.assert_array_equal(resized, whole.upscale(rgb, out_size=(80, 80)))


# --------------------------------------------------------------------------- torch.compile


def tiny_srvgg() -> SRVGGNetCompact:
    torch.manual_seed(0)
    return SRVGGNetCompact(num_feat=8, num_conv=1, upscale=2).eval()


def test_compile_module_runs_the_compiled_graph(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``compile_module`` runs the network through ``torch.compile``: dynamo captures its graph, and the
    captured graph computes every window. A recording backend stands in for inductor, whose C++ build
    of even a tiny network takes most of a minute on a small CPU (and is torch's to test), so a silent
    fall back to eager would fail here instead of passing."""
    graphs: list[torch.fx.GraphModule] = []
    runs: list[bool] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        graphs.append(gm)

        def run(*args: torch.Tensor) -> Any:
            runs.append(any(tuple(a.shape) == (1, 3, 24, 32) for a in args))  # the window among the weights
            return gm.forward(*args)

        return run

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: real_compile(module, backend=recording, **kwargs))
    torch._dynamo.reset()  # nothing compiled by an earlier test is reused
    try:
        rgb = image(24, 32, seed=6)
        eager = Upscaler(network(tiny_srvgg(), 2), device=CPU, dtype=torch.float32, convolution="direct").upscale(rgb)
        up = Upscaler(
            network(tiny_srvgg(), 2), device=CPU, dtype=torch.float32, convolution="direct", compile_module=True
        )
        with caplog.at_level(logging.WARNING, logger="upscale_server.inference.engine.upscaler"):
            got = up.upscale(rgb)
            again = up.upscale(rgb)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1  # captured once and whole: the tiny network's three convolutions
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_function"].count(torch.conv2d) == 3
    assert runs == [True, True]  # and the captured graph computed both calls
    assert up._compiled and not up._compile_failed
    assert not [r for r in caplog.records if r.name == engine_module.__name__]
    np.testing.assert_allclose(got, eager, atol=1e-5)
    np.testing.assert_array_equal(got, again)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def fake_compile(module: nn.Module, **kwargs: Any) -> Any:
        def broken(x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            raise RuntimeError("InductorError: C++ compile error\nlong details")

        return broken

    monkeypatch.setattr(torch, "compile", fake_compile)
    net = TinyNet(2, seed=3)
    rgb = image(40, 30)
    up = Upscaler(network(net, 2), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=4, compile_module=True)
    with caplog.at_level(logging.WARNING, logger="upscale_server.inference.engine.upscaler"):
        got = up.upscale(rgb)
        again = up.upscale(rgb)
    np.testing.assert_allclose(got, untiled(net, rgb), atol=2e-6)
    np.testing.assert_array_equal(got, again)
    assert calls == [1]  # tried once, then eager for every later window and call
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "C++ compile error" in warnings[0] and "long details" not in warnings[0]


def test_compile_out_of_memory_is_still_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory in a compiled pass halves the tile as usual; compilation stays on."""

    def fake_compile(module: nn.Module, **kwargs: Any) -> Any:
        def run(x: torch.Tensor) -> torch.Tensor:
            if x.shape[2] * x.shape[3] > 40 * 40:
                raise torch.OutOfMemoryError("CUDA out of memory")
            out: torch.Tensor = module(x)
            return out

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    net = TinyNet(2)
    rgb = image(64, 64)
    up = Upscaler(network(net, 2), device=CPU, dtype=torch.float32, tile_overlap=4, compile_module=True)
    np.testing.assert_allclose(up.upscale(rgb), untiled(net, rgb), atol=2e-6)
    assert not up._compile_failed


# --------------------------------------------------------------------------- CUDA upload path


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prefetched_windows_match_the_cpu() -> None:
    net = TinyNet(4, seed=8)
    rgb = image(150, 170, seed=8)
    want = Upscaler(network(TinyNet(4, seed=8), 4), device=CPU, dtype=torch.float32).upscale(rgb)
    cuda = torch.device("cuda")
    up = Upscaler(network(net, 4), device=cuda, dtype=torch.float32, tile_size=32, tile_overlap=8)
    np.testing.assert_allclose(up.upscale(rgb), want, atol=3e-3)  # cudnn may use TF32
    np.testing.assert_allclose(up.upscale(rgb, out_size=(340, 300)), resize_pixels(want, 340, 300), atol=3e-3)
    single = Upscaler(network(TinyNet(4, seed=8), 4), device=cuda, dtype=torch.float32)
    levels = single.upscale(rgb, quantize_8bit=True) * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.abs(levels - np.floor(single.upscale(rgb) * 255 + 0.5)).max() <= 1

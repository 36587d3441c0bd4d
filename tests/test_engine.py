"""The inference engine: contract, tiling equivalence, fallbacks, thread safety, real models."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from upscale_server.errors import InferenceError
from upscale_server.imaging import resize_pixels
from upscale_server.inference import archs
from upscale_server.inference.archs.base import ArchInfo
from upscale_server.inference.archs.rrdbnet import DESCRIPTOR as RRDBNET
from upscale_server.inference.archs.srvgg import DESCRIPTOR as SRVGG
from upscale_server.inference.archs.srvgg import SRVGGNetCompactArchitecture
from upscale_server.inference.engine import upscaler as engine_module
from upscale_server.inference.engine.resize import ResizeUpscaler
from upscale_server.inference.engine.tiling import plan_tiles
from upscale_server.inference.engine.upscaler import MIN_TILE, Upscaler, bytes_per_input_pixel
from upscale_server.inference.weights.loading import LoadedNetwork

CPU = torch.device("cpu")
PHOTO = Path(__file__).resolve().parent / "data" / "photo_grace_hopper.jpg"


class TinyNet(nn.Module):
    """Two 3x3 convs (receptive radius 2) + pixel shuffle + nearest base: a miniature SRVGG."""

    def __init__(self, scale: int = 2, *, seed: int = 0, bias: float = 0.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 3 * scale * scale, 3, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
                conv.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.conv2(torch.tanh(self.conv1(x))), self.scale)
        return out + F.interpolate(x, scale_factor=float(self.scale), mode="nearest")


class SharedSizes(list[tuple[int, int]]):
    """A record that module copies share (the CPU bf16 method runs a bf16 copy of the module)."""

    def __deepcopy__(self, memo: dict[int, object]) -> SharedSizes:
        return self


class Recording(nn.Module):
    """Wraps a module and records the (H, W) of every input it sees (thread-safe append)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sizes: list[tuple[int, int]] = SharedSizes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append((x.shape[2], x.shape[3]))
        out: torch.Tensor = self.inner(x)
        return out


class OomAbove(Recording):
    """Raises CUDA-style out-of-memory for windows with more than ``limit`` pixels."""

    def __init__(self, inner: nn.Module, limit: int, *, message_only: bool = False) -> None:
        super().__init__(inner)
        self.limit = limit
        self.message_only = message_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append((x.shape[2], x.shape[3]))
        if x.shape[2] * x.shape[3] > self.limit:
            text = "CUDA out of memory. Tried to allocate 2.00 GiB"
            raise RuntimeError(text) if self.message_only else torch.OutOfMemoryError(text)
        out: torch.Tensor = self.inner(x)
        return out


class SharedCount:
    """A counter that module copies share (the CPU bf16 method runs a bf16 copy of the module)."""

    def __init__(self) -> None:
        self.value = 0

    def __deepcopy__(self, memo: dict[int, object]) -> SharedCount:
        return self


class BadInLowPrecision(Recording):
    """Correct in fp32; NaN (or black) when its convs run in reduced precision (the CPU bf16 method)."""

    def __init__(self, inner: nn.Module, mode: str) -> None:
        super().__init__(inner)
        self.mode = mode
        self.count = SharedCount()

    @property
    def low_precision_calls(self) -> int:
        return self.count.value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        probe = self.inner.conv1(x[:, :, :1, :1])
        if probe.dtype != torch.float32:
            self.count.value += 1
            return torch.full_like(out, float("nan")) if self.mode == "nan" else torch.zeros_like(out)
        return out


class Unshuffle2(nn.Module):
    """A scale-2 net that pixel-unshuffles by 2 first (like RealESRGAN_x2plus): needs even sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyNet(scale=4, seed=3)
        self.conv_in = nn.Conv2d(12, 3, 1)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append((x.shape[2], x.shape[3]))
        out: torch.Tensor = self.body(torch.sigmoid(self.conv_in(F.pixel_unshuffle(x, 2))))
        return out


def network(module: nn.Module, scale: int, arch: str = "SRVGGNetCompact") -> LoadedNetwork:
    info = ArchInfo(arch=arch, scale=scale, params={})
    return LoadedNetwork(module=module.eval(), arch=archs.by_name(arch), info=info, path=Path("fake.safetensors"))


def untiled(module: nn.Module, rgb: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        y = module(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    return np.clip(y[0].permute(1, 2, 0).numpy(), 0.0, 1.0)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 37), (29, 1), (50, 50), (61, 97), (64, 128)])
def test_tiled_equals_untiled_on_a_tiny_net(scale: int, h: int, w: int) -> None:
    net = TinyNet(scale)
    rgb = image(h, w)
    want = untiled(net, rgb)
    up = Upscaler(network(net, scale), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=4)
    got = up.upscale(rgb)
    assert got.shape == (h * scale, w * scale, 3)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_output_is_clamped_and_input_untouched() -> None:
    net = TinyNet(2, bias=3.0)
    rgb = image(20, 30)
    before = rgb.copy()
    got = Upscaler(network(net, 2), device=CPU, dtype=torch.float32, tile_size=8, tile_overlap=2).upscale(rgb)
    assert got.min() >= 0.0 and got.max() <= 1.0
    assert (got == 1.0).mean() > 0.5  # the bias really pushed values past 1 before the clamp
    np.testing.assert_array_equal(rgb, before)


def test_image_that_fits_is_one_call() -> None:
    rec = Recording(TinyNet(2))
    up = Upscaler(network(rec, 2), device=CPU, dtype=torch.float32, tile_size=64, tile_overlap=8)
    up.upscale(image(40, 60))
    assert rec.sizes == [(40, 60)]


def test_tiles_have_equal_shapes_and_progress_reaches_total() -> None:
    rec = Recording(TinyNet(2))
    up = Upscaler(network(rec, 2), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=4)
    calls: list[tuple[int, int]] = []
    up.upscale(image(50, 70), progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert total > 1
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert set(rec.sizes) == {(24, 24)}
    assert len(rec.sizes) == total


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float64), "float32"),
        (np.zeros((4, 4, 3), dtype=np.uint8), "float32"),
        (np.zeros((4, 4), dtype=np.float32), "H x W x 3"),
        (np.zeros((4, 4, 4), dtype=np.float32), "H x W x 3"),
        (np.zeros((0, 4, 3), dtype=np.float32), "non-empty"),
        (np.full((4, 4, 3), 1.5, dtype=np.float32), r"\[0, 1\]"),
        (np.full((4, 4, 3), -0.1, dtype=np.float32), r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan, dtype=np.float32), r"\[0, 1\]"),
        ([[0.0, 0.0, 0.0]], "numpy array"),
    ],
)
def test_bad_input_is_a_value_error(bad: object, message: str) -> None:
    up = Upscaler(network(TinyNet(2), 2), device=CPU, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        up.upscale(bad)  # type: ignore[arg-type]


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="float16"):
        Upscaler(network(TinyNet(2), 2), device=CPU, dtype=torch.float16)


def test_unshuffle_models_get_padded_inputs_and_cropped_outputs() -> None:
    net = Unshuffle2()
    up = Upscaler(network(net, 2, arch="RRDBNet"), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=5)
    got = up.upscale(image(7, 9))
    assert got.shape == (14, 18, 3)
    # Tiled on an even image: every window is even-sized and starts on the unshuffle grid, so the
    # tiled result equals the untiled one.
    net.sizes.clear()
    rgb = image(60, 90, seed=1)
    got = up.upscale(rgb)
    assert len(net.sizes) > 1
    assert all(h % 2 == 0 and w % 2 == 0 for h, w in net.sizes)
    np.testing.assert_allclose(got, untiled(net, rgb), atol=2e-6)
    # Odd sizes are reflect-padded: the kept part equals the padded untiled run, cropped.
    rgb = image(31, 45, seed=2)
    padded = np.pad(rgb, ((0, 1), (0, 1), (0, 0)), mode="reflect")
    np.testing.assert_allclose(up.upscale(rgb), untiled(net, padded)[:62, :90], atol=2e-6)


def test_the_resize_engine_makes_the_size_asked_for_like_the_network_engine() -> None:
    """Both engines take the same call (the pipeline no longer tells them apart): ``out_size`` is the
    native output resized, ``quantize_8bit`` may be ignored."""
    resize = ResizeUpscaler(4)
    rgb = image(13, 21, seed=4)
    native = resize.upscale(rgb)
    assert native.shape == (52, 84, 3)
    for out_size in ((42, 26), (63, 39), (84, 52)):
        got = resize.upscale(rgb, out_size=out_size, quantize_8bit=True)
        np.testing.assert_array_equal(got, resize_pixels(native, *out_size))
        assert got.dtype == np.float32 and got.flags.c_contiguous
    calls: list[tuple[int, int]] = []
    resize.upscale(rgb, out_size=(42, 26), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 1)]
    for up in (resize, Upscaler(network(TinyNet(4), 4), device=CPU, dtype=torch.float32)):
        with pytest.raises(ValueError, match="out_size must be positive"):
            up.upscale(rgb, out_size=(0, 10))


# --------------------------------------------------------------------------- tile size


def test_tile_size_for(monkeypatch: pytest.MonkeyPatch) -> None:
    up = Upscaler(network(TinyNet(4), 4, "RRDBNet"), device=CPU, dtype=torch.float32, tile_overlap=16)
    per_px = bytes_per_input_pixel(RRDBNET, 4, torch.float32)
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: 64 << 30)
    assert up.tile_size_for(300, 500) == 500  # fits: not tiled
    share = engine_module.MEMORY_FRACTION["cpu"]
    free = int(600 * 600 * per_px / share)  # the CPU's share of it holds a 600 x 600 window
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: free)
    tile = up.tile_size_for(2000, 3000)
    assert tile % 8 == 0 and tile <= 600 - 32
    assert (tile + 32) ** 2 * per_px <= free * share
    # Spread evenly: as many tiles as the largest that fits (568) needs, but smaller windows.
    largest, even = plan_tiles(2000, 3000, 568, 16), plan_tiles(2000, 3000, tile, 16)
    assert len(even) == len(largest) == 4 * 6 and tile == 496
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: int(1100 * 1100 * per_px / share))
    assert up.tile_size_for(2048, 2048) == 1008  # not 1064: two 1040-pixel windows per side, not two 1096
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: 1 << 20)
    assert up.tile_size_for(2000, 3000) == MIN_TILE
    explicit = Upscaler(network(TinyNet(4), 4), device=CPU, dtype=torch.float32, tile_size=200)
    assert explicit.tile_size_for(2000, 3000) == 200
    # SRVGG needs far less memory per pixel than RRDB, fp16 half of fp32.
    assert bytes_per_input_pixel(SRVGG, 4, torch.float32) < per_px / 5
    assert bytes_per_input_pixel(RRDBNET, 4, torch.float16) * 2 == pytest.approx(per_px, rel=0.01)


# --------------------------------------------------------------------------- failures and fallbacks


@pytest.mark.parametrize("message_only", [False, True])
def test_out_of_memory_halves_the_tile_and_retries(message_only: bool, caplog: pytest.LogCaptureFixture) -> None:
    net = TinyNet(2)
    module = OomAbove(net, limit=60 * 60, message_only=message_only)
    up = Upscaler(network(module, 2), device=CPU, dtype=torch.float32, tile_size=128, tile_overlap=4)
    rgb = image(100, 90)
    progress: list[tuple[int, int]] = []
    with caplog.at_level(logging.WARNING, logger="upscale_server.inference.engine.upscaler"):
        got = up.upscale(rgb, progress=lambda d, t: progress.append((d, t)))
    np.testing.assert_allclose(got, untiled(net, rgb), atol=2e-6)
    # 100 x 90 whole -> OOM; tile 50 (58-px windows) fits.
    assert module.sizes[0] == (100, 90)
    assert all(h * w <= 60 * 60 for h, w in module.sizes[1:])
    assert "retrying with 50px" in caplog.text
    assert progress[-1][0] == progress[-1][1] > 1


def test_out_of_memory_below_the_floor_is_an_inference_error() -> None:
    module = OomAbove(TinyNet(2), limit=10)
    up = Upscaler(network(module, 2), device=CPU, dtype=torch.float32, tile_size=64, tile_overlap=4)
    with pytest.raises(InferenceError, match="out of memory") as info:
        up.upscale(image(100, 100))
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    tiles_tried = sorted({max(h, w) - 8 for h, w in module.sizes if h < 100}, reverse=True)
    assert tiles_tried == [64, 32]  # halved down to the floor, not below


def test_other_network_errors_become_inference_errors(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    up = Upscaler(network(Broken(), 2), device=CPU, dtype=torch.float32)
    with (
        caplog.at_level(logging.ERROR, logger="upscale_server.inference.engine.upscaler"),
        pytest.raises(InferenceError) as info,
    ):
        up.upscale(image(8, 8))
    assert "shapes cannot be multiplied" in info.value.message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert any(r.exc_info for r in caplog.records)  # traceback logged, not swallowed


def test_wrong_output_shape_is_an_inference_error() -> None:
    up = Upscaler(network(TinyNet(2), 4), device=CPU, dtype=torch.float32)  # claims x4, is x2
    with pytest.raises(InferenceError, match="shape"):
        up.upscale(image(8, 8))


def test_nan_in_full_precision_is_an_inference_error() -> None:
    class NanNet(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(F.interpolate(x, scale_factor=2.0), float("nan"))

    with pytest.raises(InferenceError, match="non-finite"):
        Upscaler(network(NanNet(), 2), device=CPU, dtype=torch.float32).upscale(image(8, 8))


@pytest.mark.parametrize("mode", ["nan", "black"])
def test_bad_low_precision_tiles_are_redone_in_fp32(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    net = TinyNet(2)
    module = BadInLowPrecision(net, mode)
    up = Upscaler(network(module, 2), device=CPU, dtype=torch.bfloat16, tile_size=16, tile_overlap=4)
    rgb = image(40, 50) * 0.5 + 0.25  # visible everywhere, so a black tile is suspicious
    with caplog.at_level(logging.WARNING, logger="upscale_server.inference.engine.upscaler"):
        got = up.upscale(rgb)
        up.upscale(rgb)
    # Every tile failed in bf16 and was redone in fp32: the result is the exact fp32 one.
    assert module.low_precision_calls > 1
    np.testing.assert_allclose(got, untiled(net, rgb), atol=2e-6)
    fallbacks = [r for r in caplog.records if "redoing such tiles in fp32" in r.getMessage()]
    assert len(fallbacks) == 1  # logged once per upscaler, not per tile


def test_an_architecture_without_a_bf16_mode_runs_in_fp32(caplog: pytest.LogCaptureFixture) -> None:
    class NoBf16(SRVGGNetCompactArchitecture):
        supports_bf16 = False

    net = TinyNet(2)
    module = BadInLowPrecision(net, "nan")
    info = ArchInfo("SRVGGNetCompact", 2, {})
    network = LoadedNetwork(module=module.eval(), arch=NoBf16(), info=info, path=Path("fake.safetensors"))
    with caplog.at_level(logging.WARNING, logger="upscale_server.inference.engine.upscaler"):
        up = Upscaler(network, device=CPU, dtype=torch.bfloat16, tile_size=16, tile_overlap=4)
    assert up.dtype == torch.float32
    assert "SRVGGNetCompact has no bfloat16 mode; running it in float32" in caplog.text
    rgb = image(40, 50)
    np.testing.assert_allclose(up.upscale(rgb), untiled(net, rgb), atol=2e-6)
    assert module.low_precision_calls == 0  # never ran in bf16, so nothing needed redoing


def test_black_output_from_black_input_is_not_a_fallback() -> None:
    module = BadInLowPrecision(TinyNet(2), "black")
    up = Upscaler(network(module, 2), device=CPU, dtype=torch.bfloat16, tile_size=16, tile_overlap=4)
    got = up.upscale(np.zeros((20, 20, 3), dtype=np.float32))
    assert module.low_precision_calls == 1 and got.max() == 0.0


def test_bf16_on_cpu_is_close_to_fp32() -> None:
    net = TinyNet(2)
    rgb = image(30, 40)
    got = Upscaler(network(net, 2), device=CPU, dtype=torch.bfloat16).upscale(rgb)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, untiled(net, rgb), atol=0.05)


# --------------------------------------------------------------------------- threads


def test_concurrent_calls_match_sequential_calls() -> None:
    class Slow(nn.Module):
        """Sleeps in forward (releasing the GIL) so two calls really interleave."""

        def __init__(self) -> None:
            super().__init__()
            self.net = TinyNet(2, seed=5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(0.002)
            out: torch.Tensor = self.net(x)
            return out

    up = Upscaler(network(Slow(), 2), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=4)
    images = [image(70, 50, seed=10), image(45, 90, seed=11)]
    sequential = [up.upscale(rgb) for rgb in images]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = up.upscale(images[i])
                np.testing.assert_array_equal(results[i], sequential[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        np.testing.assert_array_equal(results[i], sequential[i])


# --------------------------------------------------------------------------- real models


def _photo_crop(top: int, left: int, height: int, width: int) -> np.ndarray:
    with Image.open(PHOTO) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(pixels[top : top + height, left : left + width])


def _levels(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() * 255.0)


@pytest.mark.slow
def test_real_x4plus_tiled_matches_untiled(load_real_network: Callable[[str], LoadedNetwork]) -> None:
    """RealESRGAN_x4plus, fp32 CPU: a 2 x 2 tile grid with the default overlap is within 1 level."""
    rgb = _photo_crop(150, 150, 141, 139)  # odd sizes, not a multiple of the tile
    net = load_real_network("runware:504@1")
    whole = Upscaler(net, device=CPU, dtype=torch.float32).upscale(rgb)
    tiles: list[int] = []
    up = Upscaler(net, device=CPU, dtype=torch.float32, tile_size=8)
    assert up.tile_overlap == RRDBNET.default_tile_overlap == 64
    tiled = up.upscale(rgb, progress=lambda done, total: tiles.append(total))
    assert tiles[-1] == 4
    assert tiled.shape == whole.shape == (564, 556, 3)
    assert _levels(tiled, whole) <= 1.0


@pytest.mark.slow
def test_real_animevideov3_tiled_matches_untiled(load_real_network: Callable[[str], LoadedNetwork]) -> None:
    """realesr-animevideov3, fp32 CPU: many small tiles with the default overlap, within 1 level."""
    rgb = _photo_crop(60, 100, 75, 100)
    net = load_real_network("local:realesr-animevideov3@1")
    whole = Upscaler(net, device=CPU, dtype=torch.float32).upscale(rgb)
    tiles: list[int] = []
    up = Upscaler(net, device=CPU, dtype=torch.float32, tile_size=8)
    assert up.tile_overlap == SRVGG.default_tile_overlap
    tiled = up.upscale(rgb, progress=lambda done, total: tiles.append(total))
    assert tiles[-1] > 4
    assert tiled.shape == whole.shape == (300, 400, 3)
    assert _levels(tiled, whole) <= 1.0

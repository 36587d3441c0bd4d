"""The CUDA device pipeline, checked on the CPU: its pure parts (buckets, budgets, the window cap, error
classes) and its torch parts (Lanczos, blending, masked padding, the split fp32 redo), then the whole
pipeline forced onto the CPU against the host path, on tiny nets and on real weights."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.test_engine import CPU, PHOTO, BadInLowPrecision, OomAbove, Recording, TinyNet, image, network, untiled
from upscale_server.imaging import resize_pixels
from upscale_server.inference.archs.rrdbnet import DESCRIPTOR as RRDBNET
from upscale_server.inference.archs.srvgg import DESCRIPTOR as SRVGG
from upscale_server.inference.engine import buckets, device_ops
from upscale_server.inference.engine.tiling import blend_into, plan_tiles, tile_weights
from upscale_server.inference.engine.upscaler import Upscaler, bytes_per_input_pixel
from upscale_server.inference.runtime.batching import DynamicBatcher
from upscale_server.inference.weights.loading import LoadedNetwork


def _chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def _levels(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b) * 255.0
    return float(d.max()), float(d.mean())


def _photo() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.float32) / 255.0


def device_upscaler(module: nn.Module, scale: int, **kwargs: object) -> Upscaler:
    return Upscaler(network(module, scale), device=CPU, device_pipeline=True, convolution="direct", **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- buckets


def test_window_cap_keeps_a_batch_under_2_31_elements() -> None:
    x4plus = RRDBNET.largest_activation_per_input_pixel(4)
    assert x4plus == 64 * 16
    assert buckets.window_cap(x4plus, 8) == 504  # 8 x 1024 x 512**2 is 2**31: one element over
    assert buckets.window_cap(x4plus, 1) == 1448
    for batch in (1, 4, 8):
        side = buckets.window_cap(x4plus, batch)
        assert batch * x4plus * side * side <= buckets.MAX_ACTIVATION_ELEMENTS
        assert batch * x4plus * (side + 8) ** 2 > buckets.MAX_ACTIVATION_ELEMENTS
    assert buckets.usable_buckets(504) == (128, 192, 256, 384)
    assert buckets.usable_buckets(100) == (100,)
    assert SRVGG.largest_activation_per_input_pixel(4) == 64


def test_choose_bucket_holds_small_images_whole_and_budgets_the_whole_batch() -> None:
    kw = {"overlap": 32, "buckets": buckets.BUCKET_SIDES, "bytes_per_pixel": 1000, "multiple": 1}
    assert buckets.choose_bucket(100, 70, max_batch=8, budget=1e12, **kw) == 128
    assert buckets.choose_bucket(300, 200, max_batch=8, budget=1e12, **kw) == 384
    # The whole batch must fit: 8 x 512**2 x 1000 B = 2.1 GB.
    assert buckets.choose_bucket(2000, 2000, max_batch=8, budget=2.2e9, **kw) == 512
    assert buckets.choose_bucket(2000, 2000, max_batch=8, budget=1.0e9, **kw) == 256
    assert buckets.choose_bucket(2000, 2000, max_batch=1, budget=1.0e9, **kw) == 768
    # Nothing fits: the smallest tiling bucket, and the OOM back-off walks down from there.
    assert buckets.choose_bucket(2000, 2000, max_batch=8, budget=1.0, **kw) == 128
    assert buckets.smaller_bucket(256, buckets.BUCKET_SIDES, 32) == 192
    assert buckets.smaller_bucket(192, buckets.BUCKET_SIDES, 64) is None  # 128 leaves no tile beside 2 x 64
    assert buckets.bucket_tile(512, 64) == 384
    assert buckets.bucket_tile(512, 10, multiple=4) == 488


def test_fp32_split_halves_the_pixels_with_full_context() -> None:
    sub = buckets.fp32_split_side(512, 64)
    assert sub is not None and sub * sub <= 512 * 512 // 2 and buckets.bucket_tile(sub, 64) >= 16
    assert buckets.fp32_split_side(128, 64) is None  # too small to split: runs whole


def test_resource_errors_back_off_like_out_of_memory() -> None:
    for message in (
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
        "CUDNN_STATUS_ALLOC_FAILED",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "CUDA out of memory. Tried to allocate 2.00 GiB",
    ):
        assert device_ops.is_resource_error(RuntimeError(message))
    assert device_ops.is_resource_error(torch.OutOfMemoryError("x"))
    assert not device_ops.is_resource_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not device_ops.is_resource_error(ValueError("cudnn error"))


# --------------------------------------------------------------------------- torch ops


@pytest.mark.parametrize("source", ["random", "photo"])
def test_lanczos_matches_pillow_within_a_fraction_of_a_level(source: str) -> None:
    rgb = image(96, 120, seed=5) if source == "random" else _photo()
    h, w = rgb.shape[:2]
    native = resize_pixels(rgb, w * 4, h * 4)  # an x4 "native output"
    for width, height in ((w * 2, h * 2), (w * 3, h * 3), (w * 3 + 7, h * 2 - 5), (w // 2, h // 3)):
        got = _hwc(device_ops.lanczos_resize(_chw(native), width, height))
        worst, mean = _levels(got, resize_pixels(native, width, height))
        assert worst <= 1e-3 and mean <= 1e-4, (width, height, worst, mean)


def test_device_blend_equals_the_host_blend() -> None:
    plan = plan_tiles(70, 90, 24, 8)
    scale, feather = 3, 2
    host = np.zeros((70 * scale, 90 * scale, 3), dtype=np.float32)
    dev = torch.zeros((3, 70 * scale, 90 * scale))
    for tile in plan.tiles:
        out = image(tile.rows.win_size * scale, tile.cols.win_size * scale, seed=tile.index)
        blend_into(host, out, tile, tile_weights(plan, tile, scale, feather), scale)
        device_ops.blend_into(dev, _chw(out), plan, tile, scale=scale, feather=feather)
    np.testing.assert_array_equal(_hwc(dev), host)


def test_masked_padding_changes_nothing_inside_the_image() -> None:
    net = TinyNet(4, seed=1, bias=0.3).eval()
    rgb = image(37, 50, seed=2)
    x = _chw(rgb)[None]
    with torch.inference_mode():
        y = device_ops.masked_call(net, device_ops.with_mask(x, 37, 50, 64), net)[0, :, : 37 * 4, : 50 * 4]
    np.testing.assert_allclose(np.clip(_hwc(y), 0, 1), untiled(net, rgb), atol=1e-5)  # conv algorithms differ by shape


def test_staging_buffers_are_reused() -> None:
    pool = device_ops.StagingPool(CPU)
    for _ in range(5):
        a, b = pool.acquire(3000), pool.acquire(5000)
        pool.release(a)
        pool.release(b)
    assert pool.allocations == 2
    view = device_ops.view_as(pool.acquire(100), (2, 3, 4), torch.float32)
    assert view.shape == (2, 3, 4) and view.is_contiguous()


# --------------------------------------------------------------------------- the pipeline on the CPU


@pytest.mark.parametrize(("h", "w"), [(300, 260), (40, 50), (150, 20)])
@pytest.mark.parametrize("factor", [4, 2, 3])
def test_device_pipeline_equals_the_host_path(h: int, w: int, factor: int) -> None:
    net = TinyNet(4, seed=7)
    rgb = image(h, w, seed=3)
    host = Upscaler(network(net, 4), device=CPU, dtype=torch.float32, tile_size=16, tile_overlap=8)
    dev = device_upscaler(net, 4, dtype=torch.float32, tile_size=16, tile_overlap=8)
    size = (w * factor, h * factor)
    worst, _ = _levels(dev.upscale(rgb, out_size=size), host.upscale(rgb, out_size=size))
    assert worst < 1e-3
    odd = (w * 2 + 3, h * 3 - 1)  # non-integer: the whole native canvas is resized on the device
    worst, _ = _levels(dev.upscale(rgb, out_size=odd), resize_pixels(untiled(net, rgb), *odd))
    assert worst < 1e-3
    quantized = dev.upscale(rgb, quantize_8bit=True, out_size=size)
    expected = np.floor(host.upscale(rgb, out_size=size) * 255 + 0.5)
    steps = np.abs(np.round(quantized * 255) - expected)  # float noise can cross a rounding boundary
    assert steps.max() <= 1 and steps.mean() < 1e-4


def test_windows_of_different_requests_share_batches() -> None:
    recording = Recording(TinyNet(4, seed=3))
    batcher = DynamicBatcher(window_s=0.2, max_batch=8)
    try:
        up = device_upscaler(recording, 4, dtype=torch.float32, tile_overlap=8, batcher=batcher)
        images = [image(60 + 7 * i, 90 - 5 * i, seed=i) for i in range(4)]  # four sizes, one bucket
        results: list[np.ndarray | None] = [None] * 4

        def run(i: int) -> None:
            results[i] = up.upscale(images[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        batcher.close()
    assert set(recording.sizes) == {(128, 128)}
    assert len(recording.sizes) < 4  # at least two requests shared a pass
    for rgb, got in zip(images, results, strict=True):
        assert got is not None
        assert _levels(got, untiled(recording.inner, rgb))[0] < 1e-3


def test_suspicious_window_is_redone_in_fp32_in_halves(caplog: pytest.LogCaptureFixture) -> None:
    net = TinyNet(4)
    module = Recording(BadInLowPrecision(net, "nan"))
    up = device_upscaler(module, 4, dtype=torch.bfloat16, tile_overlap=8)
    up._buckets = (256,)
    rgb = image(200, 230) * 0.5 + 0.25
    with caplog.at_level(logging.WARNING, logger="upscale_server.inference.engine.upscaler"):
        got = up.upscale(rgb)
    assert module.sizes[0] == (256, 256)  # the bf16 window (masked padding)
    sub = buckets.fp32_split_side(256, 8)
    assert sub is not None and set(module.sizes[1:]) <= {(sub, sub)} and len(module.sizes) > 2
    assert _levels(got, untiled(net, rgb))[0] < 1e-3
    assert "redoing such tiles in fp32" in caplog.text


@pytest.mark.parametrize("message", ["CUDA out of memory", "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"])
def test_out_of_memory_and_cudnn_failures_step_down_a_bucket(message: str, caplog: pytest.LogCaptureFixture) -> None:
    class Refuses(OomAbove):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[2] * x.shape[3] > self.limit:
                self.sizes.append((x.shape[2], x.shape[3]))
                raise RuntimeError(message)
            return super().forward(x)

    net = TinyNet(4, seed=2)
    module = Refuses(net, limit=200 * 200)
    up = device_upscaler(module, 4, dtype=torch.float32, tile_overlap=8)
    rgb = image(300, 300)
    with caplog.at_level(logging.WARNING, logger="upscale_server.inference.engine.upscaler"):
        got = up.upscale(rgb)
    assert module.sizes[0] == (384, 384) and (192, 192) in module.sizes
    assert "retrying with 256px" in caplog.text
    assert _levels(got, untiled(net, rgb))[0] < 1e-3


def test_warm_up_runs_each_bucket_and_marks_compiled_shapes() -> None:
    recording = Recording(TinyNet(4))
    up = device_upscaler(recording, 4, dtype=torch.float32, tile_overlap=8)
    up._buckets = (128, 192)
    assert up.warm_up() == [(1, 128), (1, 192)]
    assert recording.sizes == [(128, 128), (192, 192)]
    assert up._compiled_shapes == {(1, 3, 128, 128), (1, 3, 192, 192)}
    host = Upscaler(network(TinyNet(4), 4), device=CPU, dtype=torch.float32)
    assert host.warm_up() == []  # the host path has nothing to warm


def test_tile_choice_budgets_max_batch_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    from upscale_server.inference.engine import upscaler as engine_module

    batcher = DynamicBatcher(window_s=0.0, max_batch=8)
    try:
        up = Upscaler(network(TinyNet(4), 4, arch="RRDBNet"), device=CPU, dtype=torch.float32, batcher=batcher)
        up._device_pipeline = True
        per_px = bytes_per_input_pixel(RRDBNET, 4, torch.float32)
        budget_bytes = 8 * 256 * 256 * per_px
        monkeypatch.setattr(
            engine_module, "free_memory_bytes", lambda _d: budget_bytes / engine_module.MEMORY_FRACTION["cpu"]
        )
        assert up._bucket_for(2000, 2000) == 256
        assert up.tile_size_for(2000, 2000) == 256 - 2 * 64
    finally:
        batcher.close()


@pytest.mark.slow
@pytest.mark.parametrize("factor", [4, 2, 3])
def test_real_animevideov3_device_pipeline_matches_the_host_path(
    load_real_network: Callable[[str], LoadedNetwork], factor: int
) -> None:
    """realesr-animevideov3 fp32: bucketed, tiled and masked windows with device blending and resize
    against the host path within 1 level max and 0.01 mean."""
    net = load_real_network("local:realesr-animevideov3@1")
    photo = _photo()
    dev = Upscaler(net, device=CPU, dtype=torch.float32, device_pipeline=True, convolution="direct", tile_size=8)
    host = Upscaler(net, device=CPU, dtype=torch.float32, convolution="direct")
    for rgb in (np.ascontiguousarray(photo[100:250, 120:260]), np.ascontiguousarray(photo[300:370, 200:290])):
        h, w = rgb.shape[:2]
        size = (w * factor, h * factor)
        worst, mean = _levels(dev.upscale(rgb, out_size=size), host.upscale(rgb, out_size=size))
        assert worst <= 1.0 and mean <= 0.01, (rgb.shape, worst, mean)

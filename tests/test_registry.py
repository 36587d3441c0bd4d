"""The model registry's GPU-path wiring: one shared batcher only when configured, closed with the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_registry
from upscale_server.config import Settings
from upscale_server.imaging import Picture
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.pipeline import UpscalePipeline
from upscale_server.inference.runtime.batching import BatcherClosedError, DynamicBatcher

ANIME = "local:realesr-animevideov3@1"


def test_no_batcher_by_default(provisioned_models_dir: Path) -> None:
    registry = make_registry(Settings(device="cpu", models_dir=provisioned_models_dir))
    assert registry.batcher is None
    assert registry.compute.batch_window_s == 0 and not registry.compute.compile_module
    upscaler = registry.upscaler(registry.spec(ANIME))
    assert isinstance(upscaler, Upscaler)
    assert upscaler.batcher is None and upscaler.compile_module is False
    registry.close()  # nothing to close: still fine


def test_batch_window_builds_one_batcher_shared_by_every_network(provisioned_models_dir: Path) -> None:
    settings = Settings(device="cpu", models_dir=provisioned_models_dir, batch_window_ms=3, max_batch=4)
    registry = make_registry(settings)
    batcher = registry.batcher
    assert isinstance(batcher, DynamicBatcher)
    assert (batcher.window_s, batcher.max_batch) == (0.003, 4)
    assert "batches of up to 4 tiles within 3 ms" in registry.compute.describe()
    anime = registry.upscaler(registry.spec(ANIME))
    anime6b = registry.upscaler(registry.spec("local:realesrgan-x4plus-anime@1"))
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


def test_compile_setting_reaches_the_engine(provisioned_models_dir: Path) -> None:
    registry = make_registry(Settings(device="cpu", models_dir=provisioned_models_dir, compile=True))
    upscaler = registry.upscaler(registry.spec(ANIME))
    assert isinstance(upscaler, Upscaler) and upscaler.compile_module is True
    assert "torch.compile" in registry.compute.describe()


def test_resize_engine_never_builds_a_batcher(tmp_path: Path) -> None:
    registry = make_registry(Settings(device="cpu", engine="resize", models_dir=tmp_path, batch_window_ms=3))
    assert registry.batcher is None

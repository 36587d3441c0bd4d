"""Shared fixtures (the real test images, the real weights, a model registry) and session-wide rules.

Session rules: the Winograd CPU kernel must have been built when the package was installed (the tests
load it, never compile it), and every test leaves torch's thread count as it found it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests import cluster_mode
from upscale_server.config import Settings
from upscale_server.inference import ComputeConfig
from upscale_server.inference.cpu import kernel
from upscale_server.inference.registry import ModelRegistry
from upscale_server.inference.weights.loading import LoadedNetwork, load_network
from upscale_server.inference.weights.manifest import Manifest, load_manifest
from upscale_server.inference.weights.provision import WeightStore

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
PHOTO = DATA / "photo_grace_hopper.jpg"
CLIPART_RGBA = DATA / "clipart_rgba.png"
#: The checkout's models folder: where a server run from this checkout keeps its weights.
MODELS = REPO / "models"


def pytest_configure(config: pytest.Config) -> None:
    """Load the installed Winograd kernel for the whole session, or stop it with one line: a test never
    compiles the kernel, and never skips the Winograd path for want of it."""
    try:
        kernel.load()
    except OSError as exc:
        how = "" if "reinstall: pip install -e ." in str(exc) else "; reinstall: pip install -e ."
        raise pytest.UsageError(f"the Winograd CPU kernel cannot be loaded: {exc}{how}") from None


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """Tests may change torch's process-wide thread count (the ncnn comparison runs on 2); not beyond."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_registry(settings: Settings) -> ModelRegistry:
    """A model registry on the compute ``settings`` resolve to, as the app builds it."""
    return ModelRegistry(settings, ComputeConfig.from_settings(settings))


@pytest.fixture(scope="session")
def photo_path() -> Path:
    return PHOTO


@pytest.fixture(scope="session")
def clipart_path() -> Path:
    return CLIPART_RGBA


# --- Real weights: the three ncnn-backed models, converted once into the repo's models/ folder ---------
# The converted files are git-ignored and reproducible (pinned by sha256 in the manifest), so the first
# test session converts them (a few seconds) and later sessions, CI included, reuse them.


@pytest.fixture(scope="session")
def manifest() -> Manifest:
    return load_manifest()


@pytest.fixture(scope="session")
def provisioned_models_dir(manifest: Manifest) -> Path:
    """The checkout's ``models/`` with every ncnn-backed model converted and sha256-checked."""
    store = WeightStore(MODELS)
    for spec in manifest.models:
        if spec.ncnn is not None:
            # Without its dropped-in names and its URL, the ncnn conversion is the only source.
            store.ensure(dataclasses.replace(spec, files=(), url=None))
    return MODELS


@pytest.fixture(scope="session")
def load_real_network(manifest: Manifest, provisioned_models_dir: Path) -> Callable[[str], LoadedNetwork]:
    """``load_real_network(model_id)``: the real network for a manifest id, loaded once per session.

    Always the ncnn-converted weights (never a file someone dropped into models/), so results are the
    same on every machine and match the ncnn runtime.
    """
    cache: dict[str, LoadedNetwork] = {}

    def load(model_id: str) -> LoadedNetwork:
        if model_id not in cache:
            spec = manifest.get(model_id)
            if spec.ncnn is None:
                raise ValueError(f"{model_id} has no ncnn source: no real weights in CI")
            cache[model_id] = load_network(provisioned_models_dir / spec.ncnn.converted)
        return cache[model_id]

    return load


@pytest.fixture(scope="session", autouse=True)
def _cluster_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """With ``--cluster``: the session's Redis and S3, which the API helpers then point every app at."""
    if not request.config.getoption("--cluster"):
        yield
        return
    with cluster_mode.cluster_target(tmp_path_factory.mktemp("cluster-target")):
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--cluster"):
        cluster_mode.skip_local_only(items)

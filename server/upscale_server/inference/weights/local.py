"""Weight files dropped into the models folder become models: ``4x-UltraSharp.pth`` -> ``local:4x-ultrasharp@1``.

People who upscale locally collect community models (ESRGAN and Real-ESRGAN Compact networks saved by
many trainers); naming each one in the manifest would be busywork. Every ``.pth``/``.safetensors`` file
the manifest does not already claim is read (shapes only) and, when it is an architecture we run,
offered under an id made from its file name. A bad file is reported with its reason and never hides the
others.

Scans are cheap enough to run on every lookup: the folder is listed and stat'ed, and a file is read
again only when its (mtime, size) changed, so a file added or replaced while the server runs is seen
at the next request without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from upscale_server.errors import UpscaleError
from upscale_server.inference.archs.base import ArchInfo
from upscale_server.inference.weights.detect import detect_state
from upscale_server.inference.weights.loading import SAFETENSORS_SUFFIX, read_state_dict
from upscale_server.inference.weights.manifest import LOCAL_ID_PREFIX, Manifest, ModelSpec
from upscale_server.vocabulary import UPSCALE_FACTORS

logger = logging.getLogger(__name__)

ID_PREFIX = LOCAL_ID_PREFIX
ID_VERSION = "@1"
SUFFIXES = frozenset({".pth", SAFETENSORS_SUFFIX})


def local_model_id(path: Path) -> str:
    """``local:`` + the file name without extension, lower case, + ``@1``."""
    return f"{ID_PREFIX}{path.stem.lower()}{ID_VERSION}"


def upscale_factors(scale: int) -> tuple[int, ...]:
    """The factors a network of native ``scale`` serves: its own, and smaller ones by a downscale after it."""
    return tuple(f for f in UPSCALE_FACTORS if f <= scale)


@dataclass(frozen=True)
class LocalFile:
    """One weight file of the folder, as last seen: the model it is, or why it is not one."""

    path: Path
    mtime_ns: int
    size: int
    spec: ModelSpec | None
    reason: str = ""  # why the file is not a model ("" when it is)


def _shapes_only(path: Path) -> dict[str, torch.Tensor]:
    """The state dict with meta tensors (shapes and dtypes, no data): detection reads nothing more.

    safetensors keeps shapes in its header; a zip ``.pth`` is memory-mapped, so its tensors are not read
    either (an old-format ``.pth`` cannot be mapped and is read whole)."""
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}  # noqa: SIM118
        except Exception:  # a truncated or foreign file: let the full reader word the refusal
            return read_state_dict(path)
    return read_state_dict(path, mmap=True)


def describe(info: ArchInfo) -> str:
    """``RRDBNet x4, num_block=23 num_feat=64 num_grow_ch=32``: what a listing shows of a detected file."""
    params = " ".join(f"{k}={v}" for k, v in info.params.items())
    return f"{info.arch} x{info.scale}, {params}"


def _spec(path: Path, info: ArchInfo) -> ModelSpec:
    role = "restoration (1x: cleans up, does not upscale)" if info.scale == 1 else f"upscales up to {info.scale}x"
    return ModelSpec(
        id=local_model_id(path),
        name=path.stem,
        description=f"Your model {path.name}: {describe(info)}; {role}.",
        arch=info.arch,
        scale=info.scale,
        params=MappingProxyType(dict(info.params)),
        files=(path.name,),
        native_scales=MappingProxyType({}),
        ncnn=None,
        url=None,
        upscale_factors=upscale_factors(info.scale),
    )


class LocalModels:
    """The models dropped into ``models_dir``, rescanned on every call; safe to share between threads."""

    def __init__(self, models_dir: Path, manifest: Manifest) -> None:
        self.models_dir = models_dir
        self._manifest_ids = set(manifest.ids())
        #: Files the manifest knows by name (dropped-in, converted or downloaded official weights).
        self._claimed = {
            name.lower()
            for spec in manifest.models
            for name in (*spec.files, spec.ncnn.converted if spec.ncnn else "", spec.url.filename if spec.url else "")
            if name
        }
        self._seen: dict[Path, LocalFile] = {}
        self._lock = threading.Lock()

    def scan(self) -> tuple[LocalFile, ...]:
        """Every candidate file in name order, detected anew only when its (mtime, size) changed."""
        try:
            entries = sorted(os.scandir(self.models_dir), key=lambda e: e.name)
        except OSError:
            return ()  # no folder yet: no local models
        with self._lock:
            current: dict[Path, LocalFile] = {}
            ids: dict[str, Path] = {}
            for entry in entries:
                path = Path(entry.path)
                if path.suffix.lower() not in SUFFIXES or path.name.lower() in self._claimed:
                    continue
                try:
                    if not entry.is_file():
                        continue
                    stat = entry.stat()
                except OSError:
                    continue  # removed while we looked
                seen = self._seen.get(path)
                if seen is None or (seen.mtime_ns, seen.size) != (stat.st_mtime_ns, stat.st_size):
                    seen = self._inspect(path, stat.st_mtime_ns, stat.st_size)
                model_id = local_model_id(path)
                if seen.spec is not None and model_id in self._manifest_ids:
                    seen = LocalFile(path, seen.mtime_ns, seen.size, None, f"id {model_id} is a built-in model's")
                elif seen.spec is not None and model_id in ids:
                    taken = f"id {model_id} is taken by {ids[model_id].name}"
                    seen = LocalFile(path, seen.mtime_ns, seen.size, None, taken)
                if seen.spec is not None:
                    ids[model_id] = path
                current[path] = seen
            self._seen = current
            return tuple(current.values())

    def models(self) -> tuple[ModelSpec, ...]:
        return tuple(found.spec for found in self.scan() if found.spec is not None)

    def get(self, model_id: str) -> ModelSpec | None:
        return next((spec for spec in self.models() if spec.id == model_id), None)

    @staticmethod
    def _inspect(path: Path, mtime_ns: int, size: int) -> LocalFile:
        try:
            found = detect_state(_shapes_only(path), str(path))
        except UpscaleError as exc:
            reason = exc.message.removeprefix(f"{path}: ")
            logger.warning("%s is not used as a model: %s", path, reason)
            return LocalFile(path, mtime_ns, size, None, reason)
        except Exception as exc:  # never let one odd file stop a listing  # pragma: no cover - defensive
            logger.warning("%s is not used as a model: %s", path, exc)
            return LocalFile(path, mtime_ns, size, None, f"cannot read ({type(exc).__name__})")
        logger.info("found %s: %s", path, describe(found.info))
        return LocalFile(path, mtime_ns, size, _spec(path, found.info))

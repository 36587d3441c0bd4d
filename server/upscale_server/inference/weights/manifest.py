"""The model manifest (``manifest.toml`` beside this module): every model the server can run and its weight sources.

Parsed once into frozen dataclasses and validated up front, so a typo in the manifest fails at start-up
with the entry named, not later in the middle of a request.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from upscale_server.errors import InvalidModelError, shown
from upscale_server.inference import archs
from upscale_server.inference.archs.base import ArchInfo, Architecture

MANIFEST_NAME = "manifest.toml"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class NcnnSource:
    """Official ncnn files inside an installed Python package, converted into ``converted``.

    ``param``/``bin`` are relative to the package folder; ``sha256`` pins the converted file
    (empty means not pinned yet: the conversion is accepted with a warning).
    """

    package: str
    param: str
    bin: str
    converted: str
    sha256: str


@dataclass(frozen=True)
class UrlSource:
    """The official release file, fetched only when the user allows downloads."""

    href: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class ModelSpec:
    """One ``[[model]]`` entry. ``native_scales`` maps an upscale factor to the id that produces it."""

    id: str
    name: str
    description: str
    arch: str  # an architecture descriptor's name
    scale: int
    params: Mapping[str, int | str] = field(hash=False)
    files: tuple[str, ...]
    native_scales: Mapping[int, str] = field(hash=False)
    ncnn: NcnnSource | None
    url: UrlSource | None
    #: The factors the ``upscale`` task takes with this model (its Runware schema's enum); None: every
    #: factor the pipeline makes.
    upscale_factors: tuple[int, ...] | None = None

    @property
    def native_factors(self) -> tuple[int, ...]:
        """The factors a network makes without resizing: this model's scale and its native siblings'."""
        return tuple(sorted({self.scale, *self.native_scales}))

    @property
    def arch_info(self) -> ArchInfo:
        """The architecture as the manifest declares it (compare with what the weights say)."""
        return ArchInfo(self.arch, self.scale, self.params)


@dataclass(frozen=True)
class Manifest:
    """All models, in file order."""

    models: tuple[ModelSpec, ...]
    path: str = ""

    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.models)

    def get(self, model_id: str, aliases: Mapping[str, str] | None = None) -> ModelSpec:
        """The spec for ``model_id``, or for the model it is an alias of (``aliases``: the operator's
        ``model_aliases``); an unknown id raises InvalidModelError whose ``allowedValues`` are the
        accepted ids (the models, then the aliases)."""
        aliases = aliases or {}
        wanted = aliases.get(model_id, model_id)
        for spec in self.models:
            if spec.id == wanted:
                return spec
        accepted = [*self.ids(), *aliases]
        raise InvalidModelError(
            f"model {shown(model_id)!r} is not available on this server; use one of: {', '.join(accepted)}",
            parameter="model",
            allowed_values=accepted,
        )


def _str(entry: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = entry.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"{where}: '{key}' must be a non-empty string")
    return value


def _sha(entry: Mapping[str, Any], where: str, *, allow_empty: bool) -> str:
    value = _str(entry, "sha256", where, required=not allow_empty).lower()
    if value and not _SHA256.match(value):
        raise ValueError(f"{where}: 'sha256' must be 64 hex digits")
    return value


def _params(entry: Mapping[str, Any], arch: Architecture, where: str) -> Mapping[str, int | str]:
    raw = entry.get("params", {})
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: 'params' must be a table")
    params: dict[str, int | str] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{where}: params.{key} must be an integer or a string")
        params[key] = value
    missing = [k for k in arch.params if k not in params]
    if missing:
        raise ValueError(f"{where}: params lacks {', '.join(missing)} for {arch.name}")
    return MappingProxyType(params)


def _parse_model(entry: Mapping[str, Any], index: int) -> ModelSpec:
    where = f"manifest model #{index + 1}"
    model_id = _str(entry, "id", where)
    where = f"manifest model {model_id!r}"
    arch_name = _str(entry, "arch", where)
    if arch_name not in archs.names():
        raise ValueError(f"{where}: unknown arch {arch_name!r} (known: {', '.join(archs.names())})")
    arch = archs.by_name(arch_name)
    scale = entry.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"{where}: 'scale' must be a positive integer")
    if arch.scales is not None and scale not in arch.scales:
        *others, last = arch.scales
        allowed = f"{', '.join(map(str, others))} or {last}" if others else str(last)
        raise ValueError(f"{where}: {arch.name} scale must be {allowed}")
    files = entry.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise ValueError(f"{where}: 'files' must be a list of file names")
    if any(Path(f).name != f for f in files):
        raise ValueError(f"{where}: 'files' must be bare file names, not paths")
    native: dict[int, str] = {}
    for factor, target in dict(entry.get("native_scales", {})).items():
        if not str(factor).isdigit() or not isinstance(target, str):
            raise ValueError(f"{where}: native_scales must map integer factors to model ids")
        native[int(factor)] = target
    factors = entry.get("upscale_factors")
    if factors is not None and (
        not isinstance(factors, list)
        or not factors
        or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 2 for f in factors)
    ):
        raise ValueError(f"{where}: 'upscale_factors' must be a non-empty list of integers of at least 2")
    ncnn = None
    if "ncnn" in entry:
        t = entry["ncnn"]
        ncnn = NcnnSource(
            package=_str(t, "package", f"{where} ncnn"),
            param=_str(t, "param", f"{where} ncnn"),
            bin=_str(t, "bin", f"{where} ncnn"),
            converted=_str(t, "converted", f"{where} ncnn"),
            sha256=_sha(t, f"{where} ncnn", allow_empty=True),
        )
    url = None
    if "url" in entry:
        t = entry["url"]
        url = UrlSource(
            href=_str(t, "href", f"{where} url"),
            filename=_str(t, "filename", f"{where} url"),
            sha256=_sha(t, f"{where} url", allow_empty=False),
        )
        if not url.href.startswith("https://"):
            raise ValueError(f"{where} url: 'href' must be an https:// address")
    placed = [ncnn.converted if ncnn else "", url.filename if url else ""]
    for name in filter(None, placed):
        if Path(name).name != name:
            raise ValueError(f"{where}: {name!r} must be a bare file name, not a path")
    return ModelSpec(
        id=model_id,
        name=_str(entry, "name", where),
        description=_str(entry, "description", where, required=False),
        arch=arch.name,
        scale=scale,
        params=_params(entry, arch, where),
        files=tuple(files),
        native_scales=MappingProxyType(native),
        ncnn=ncnn,
        url=url,
        upscale_factors=None if factors is None else tuple(sorted(set(factors))),
    )


def parse_manifest(text: str, *, source: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate manifest TOML text; errors are ValueError naming the entry at fault."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: invalid TOML ({exc})") from exc
    entries = data.get("model", [])
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: no [[model]] entries")
    models: list[ModelSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        spec = _parse_model(entry, i)
        if spec.id in seen:
            raise ValueError(f"{source}: duplicate model id {spec.id!r}")
        seen.add(spec.id)
        models.append(spec)
    for spec in models:
        for factor, target in spec.native_scales.items():
            if target not in seen:
                raise ValueError(f"{source}: model {spec.id!r} native_scales.{factor} names unknown id {target!r}")
    return Manifest(models=tuple(models), path=source)


def load_manifest(path: Path | None = None) -> Manifest:
    """Load ``path``, else the manifest shipped inside the package.

    The manifest travels with the code (it says which weights the code can run), so it is package
    data, never looked up in the user's models folder.
    """
    if path is not None:
        return parse_manifest(path.read_text(encoding="utf-8"), source=str(path))
    packaged = importlib.resources.files(__package__ or __name__).joinpath(MANIFEST_NAME)
    return parse_manifest(packaged.read_text(encoding="utf-8"), source=str(packaged))


#: Ids of models that are not Runware's: manifest entries without a Runware id, and the models folder's
#: own files (``weights/local.py``).
LOCAL_ID_PREFIX = "local:"


def check_model_aliases(settings_aliases: Mapping[str, str], manifest: Manifest | None = None) -> None:
    """UnusableSettingError (start-up, one line) when an alias is a model of this server already or
    names one it does not have. A ``local:`` target (a file of the models folder) is taken as it is:
    files come and go while the server runs, and a task naming the alias then gets the file's model or
    the unknown-model error."""
    from upscale_server.config import UnusableSettingError

    known = (manifest or load_manifest()).ids()
    for alias, target in settings_aliases.items():
        if alias.startswith(LOCAL_ID_PREFIX):
            raise UnusableSettingError(
                f"invalid setting model_aliases (UPSCALE_MODEL_ALIASES): {alias} is in the namespace of this server's "
                "local models; it cannot be an alias"
            )
        if alias in known:
            raise UnusableSettingError(
                f"invalid setting model_aliases (UPSCALE_MODEL_ALIASES): {alias} is a model of this server already; "
                "it cannot be an alias"
            )
        if target not in known and not target.startswith(LOCAL_ID_PREFIX):  # a file: looked up per task
            raise UnusableSettingError(
                f"invalid setting model_aliases (UPSCALE_MODEL_ALIASES): alias {alias} names unknown model "
                f"{target!r} (known: {', '.join(known)})"
            )

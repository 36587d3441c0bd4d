"""The model manifest: parsing, lookup, validation, and where it is found."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import platformdirs
import pytest

from tests.conftest import MODELS
from upscale_server import config
from upscale_server.config import Settings, default_models_dir
from upscale_server.errors import InvalidModelError
from upscale_server.inference.archs.base import ArchInfo
from upscale_server.inference.weights import manifest as manifest_module
from upscale_server.inference.weights.manifest import Manifest, load_manifest, parse_manifest

GOOD = """
[[model]]
id = "a@1"
name = "A"
arch = "SRVGGNetCompact"
scale = 4
params = { num_feat = 64, num_conv = 16, act_type = "prelu" }
files = ["a.safetensors"]
native_scales = { 2 = "b@1" }

[[model]]
id = "b@1"
name = "B"
arch = "RRDBNet"
scale = 2
params = { num_block = 23, num_feat = 64, num_grow_ch = 32 }
url = { href = "https://example.org/b.pth", filename = "b.pth", sha256 = "%s" }
""" % ("ab" * 32)


def test_repo_manifest_lists_the_models_in_file_order(manifest: Manifest) -> None:
    assert manifest.ids() == (
        "runware:504@1",
        "local:realesrgan-x4plus-anime@1",
        "local:realesr-animevideov3@1",
        "local:realesrgan-x2plus@1",
    )
    default = manifest.get("runware:504@1")
    assert default.name == "RealESRGAN_x4plus"
    assert default.arch_info == ArchInfo("RRDBNet", 4, {"num_block": 23, "num_feat": 64, "num_grow_ch": 32})
    assert default.files == ("RealESRGAN_x4plus.safetensors", "RealESRGAN_x4plus.pth")
    assert dict(default.native_scales) == {2: "local:realesrgan-x2plus@1"}
    assert (default.upscale_factors, default.native_factors) == ((2, 4), (2, 4))  # its Runware schema: 2 or 4
    assert manifest.get("local:realesr-animevideov3@1").upscale_factors is None
    assert default.url is not None and default.url.filename == "RealESRGAN_x4plus.pth"
    x2 = manifest.get("local:realesrgan-x2plus@1")
    assert x2.ncnn is None and x2.scale == 2
    for spec in manifest.models[:3]:
        assert spec.ncnn is not None and len(spec.ncnn.sha256) == 64  # every conversion is pinned


def test_unknown_id_lists_the_known_ones(manifest: Manifest) -> None:
    with pytest.raises(InvalidModelError) as info:
        manifest.get("runware:999@1")
    assert info.value.parameter == "model"
    assert "runware:999@1" in info.value.message
    assert all(model_id in info.value.message for model_id in manifest.ids())
    assert "runware:504@1" in manifest.ids() and "nope" not in manifest.ids()


def test_specs_are_immutable(manifest: Manifest) -> None:
    spec = manifest.get("runware:504@1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.scale = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.params["num_block"] = 1  # type: ignore[index]
    assert hash(spec) == hash(manifest.get("runware:504@1"))


def test_parse_minimal_manifest() -> None:
    parsed = parse_manifest(GOOD)
    a, b = parsed.models
    assert (a.ncnn, a.url, a.description, dict(a.native_scales)) == (None, None, "", {2: "b@1"})
    assert b.url is not None and b.url.sha256 == "ab" * 32 and b.files == ()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('arch = "RRDBNet"', 'arch = "SwinIR"'), r"'b@1'.*unknown arch 'SwinIR'"),
        (('id = "b@1"', 'id = "a@1"'), r"duplicate model id 'a@1'"),
        (('2 = "b@1"', '2 = "c@1"'), r"'a@1' native_scales\.2 names unknown id 'c@1'"),
        (('sha256 = "abab', 'sha256 = "zzab'), r"'b@1' url: 'sha256' must be 64 hex digits"),
        (("scale = 2", "scale = 3"), r"'b@1': RRDBNet scale must be 1, 2, 4 or 8"),
        ((", num_grow_ch = 32", ""), r"'b@1': params lacks num_grow_ch"),
        (('files = ["a.safetensors"]', 'files = ["../a.safetensors"]'), r"'a@1': 'files' must be bare"),
        (("https://example.org", "http://example.org"), r"'b@1' url: 'href' must be an https"),
        (('name = "A"\n', ""), r"'a@1': 'name' must be a non-empty string"),
        (('name = "A"\n', 'name = "A"\nupscale_factors = [1]\n'), r"'a@1': 'upscale_factors' must be"),
        (('name = "A"\n', 'name = "A"\nupscale_factors = []\n'), r"'a@1': 'upscale_factors' must be"),
    ],
)
def test_validation_names_the_entry(edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in GOOD
    with pytest.raises(ValueError, match=message):
        parse_manifest(GOOD.replace(old, new, 1))


def test_invalid_toml_and_empty_manifest() -> None:
    with pytest.raises(ValueError, match="invalid TOML"):
        parse_manifest("[[model]\n")
    with pytest.raises(ValueError, match="no \\[\\[model\\]\\] entries"):
        parse_manifest("")


def test_the_manifest_is_package_data(manifest: Manifest) -> None:
    """It ships inside the package (wheels included), never read from a user's models folder."""
    packaged = Path(manifest_module.__file__).with_name("manifest.toml")
    assert manifest.path == str(packaged)
    assert load_manifest(packaged).models == manifest.models


def test_models_live_in_the_checkout_or_the_user_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_models_dir() == MODELS
    monkeypatch.setattr(config, "_CHECKOUT", tmp_path / "site-packages")  # an installed wheel: no checkout
    monkeypatch.setattr(platformdirs, "user_data_path", lambda name, appauthor: tmp_path / "user" / name)
    assert default_models_dir() == tmp_path / "user" / "upscale-server" / "models"
    assert Settings().models_dir == default_models_dir()

"""Your own models: files dropped into the models folder, from the scan to the CLI, the API and the playground."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.api_helpers import api_client, data_uri, encode, photo_crop, resize_settings, upscale_task
from tests.conftest import make_registry
from tests.test_cli import assert_one_line_errors, run_cli
from tests.test_detect import esrgan_layout
from upscale_server.config import Settings
from upscale_server.errors import InvalidModelError, InvalidUpscaleFactorError
from upscale_server.inference import archs
from upscale_server.inference.archs.rrdbnet import RRDBNet
from upscale_server.inference.archs.srvgg import SRVGGNetCompact
from upscale_server.inference.weights import local
from upscale_server.inference.weights.local import LocalModels, local_model_id
from upscale_server.inference.weights.manifest import load_manifest


def tiny_rrdb(scale: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(scale)
    return RRDBNet(scale=scale, num_feat=4, num_block=1, num_grow_ch=2).state_dict()


def tiny_srvgg(scale: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(scale)
    return SRVGGNetCompact(num_feat=4, num_conv=1, upscale=scale).state_dict()


def drop(folder: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    path = folder / name
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"params_ema": state}, path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    drop(models, "4x-UltraSharp.pth", tiny_rrdb(4))
    drop(models, "2x-Small.safetensors", tiny_srvgg(2))
    drop(models, "1x-Denoise.pth", tiny_srvgg(1))
    drop(models, "8x-Huge.pth", tiny_rrdb(8))
    return models


def scanner(folder: Path) -> LocalModels:
    return LocalModels(folder, load_manifest())


def test_ids_come_from_file_names() -> None:
    assert local_model_id(Path("4x-UltraSharp.pth")) == "local:4x-ultrasharp@1"
    assert local_model_id(Path("/m/Remacri.safetensors")) == "local:remacri@1"


def test_every_supported_file_becomes_a_model_with_its_detected_scale(folder: Path) -> None:
    found = {spec.id: spec for spec in scanner(folder).models()}
    assert sorted(found) == ["local:1x-denoise@1", "local:2x-small@1", "local:4x-ultrasharp@1", "local:8x-huge@1"]
    ultra = found["local:4x-ultrasharp@1"]
    assert (ultra.arch, ultra.scale, dict(ultra.params)) == (
        "RRDBNet",
        4,
        {"num_block": 1, "num_feat": 4, "num_grow_ch": 2},
    )
    assert ultra.files == ("4x-UltraSharp.pth",) and ultra.upscale_factors == (2, 3, 4)
    assert found["local:2x-small@1"].upscale_factors == (2,)
    assert found["local:8x-huge@1"].upscale_factors == (2, 3, 4)
    assert found["local:1x-denoise@1"].upscale_factors == ()
    assert "restoration" in found["local:1x-denoise@1"].description


def test_bad_files_are_refused_with_a_reason_and_hide_nothing(folder: Path) -> None:
    (folder / "truncated.pth").write_bytes((folder / "4x-UltraSharp.pth").read_bytes()[:2000])
    (folder / "garbage.safetensors").write_bytes(b"not a safetensors file")
    torch.save({"encoder.weight": torch.zeros(3, 3)}, folder / "Other-Arch.pth")
    (folder / "notes.txt").write_text("not a weight file")
    drop(folder, "4X-ULTRASHARP.safetensors", tiny_rrdb(4))  # the same id as 4x-UltraSharp.pth
    drop(folder, "RealESRGAN_x4plus_anime_6B.safetensors", tiny_rrdb(4))  # a manifest model's own file
    drop(folder, "realesrgan-x2plus.pth", tiny_rrdb(2))  # local:realesrgan-x2plus@1 is a manifest id

    files = {found.path.name: found for found in scanner(folder).scan()}

    assert "notes.txt" not in files and "RealESRGAN_x4plus_anime_6B.safetensors" not in files
    reasons = {name: found.reason for name, found in files.items() if found.spec is None}
    assert reasons.keys() == {
        "truncated.pth",
        "garbage.safetensors",
        "Other-Arch.pth",
        "4x-UltraSharp.pth",
        "realesrgan-x2plus.pth",
    }
    assert all(reason and "\n" not in reason for reason in reasons.values())
    assert reasons["Other-Arch.pth"].startswith("not a known architecture")
    assert reasons["truncated.pth"].startswith("cannot read weights")
    assert reasons["4x-UltraSharp.pth"] == "id local:4x-ultrasharp@1 is taken by 4X-ULTRASHARP.safetensors"
    assert reasons["realesrgan-x2plus.pth"] == "id local:realesrgan-x2plus@1 is a built-in model's"
    assert {"local:2x-small@1", "local:8x-huge@1", "local:4x-ultrasharp@1"} <= {
        spec.id for spec in scanner(folder).models()
    }


def test_rescans_read_only_new_or_changed_files(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = scanner(folder)
    reads: list[str] = []
    original = local._shapes_only

    def counted(path: Path) -> dict[str, torch.Tensor]:
        reads.append(path.name)
        return original(path)

    monkeypatch.setattr(local, "_shapes_only", counted)
    models.scan()
    assert len(reads) == 4
    models.scan()
    assert len(reads) == 4  # nothing changed: stat only

    drop(folder, "Remacri.pth", tiny_rrdb(4))
    assert models.get("local:remacri@1") is not None
    assert reads[4:] == ["Remacri.pth"]

    drop(folder, "Remacri.pth", tiny_rrdb(2))  # replaced: another scale
    os.utime(folder / "Remacri.pth", ns=(1, 1))
    spec = models.get("local:remacri@1")
    assert spec is not None and spec.scale == 2
    (folder / "Remacri.pth").unlink()
    assert models.get("local:remacri@1") is None


def test_a_missing_folder_has_no_models(tmp_path: Path) -> None:
    assert scanner(tmp_path / "absent").scan() == ()


# --------------------------------------------------------------------------- registry


def test_registry_finds_a_file_dropped_while_it_runs_and_reloads_a_replaced_one(folder: Path) -> None:
    registry = make_registry(Settings(device="cpu", models_dir=folder))
    with pytest.raises(InvalidModelError) as refused:
        registry.spec("local:late@1")
    assert "local:4x-ultrasharp@1" in refused.value.allowed_values  # type: ignore[operator]

    path = drop(folder, "Late.pth", tiny_rrdb(4))
    spec = registry.spec("local:late@1")
    first = registry.upscaler(spec)
    assert registry.upscaler(spec) is first and registry.is_loaded("local:late@1")

    drop(folder, "Late.pth", tiny_rrdb(4))
    os.utime(path, ns=(10**9, 10**9))
    assert registry.upscaler(registry.spec("local:late@1")) is not first  # not served from a stale copy


def test_loaded_models_are_bounded_least_recently_used_first(folder: Path) -> None:
    registry = make_registry(Settings(device="cpu", models_dir=folder, max_loaded_models=2))
    ultra, small, huge = (registry.spec(f"local:{n}@1") for n in ("4x-ultrasharp", "2x-small", "8x-huge"))
    registry.upscaler(ultra)
    registry.upscaler(small)
    registry.upscaler(ultra)  # now the most recently used
    registry.upscaler(huge)
    assert [registry.is_loaded(s.id) for s in (ultra, small, huge)] == [True, False, True]


def test_factors_go_up_to_the_native_scale(folder: Path) -> None:
    from upscale_server.inference import ComputeConfig, InferenceService

    settings = Settings(device="cpu", models_dir=folder)
    service = InferenceService(settings, ComputeConfig.from_settings(settings))
    assert service.upscale_factors("local:8x-huge@1") == (2, 3, 4)
    assert service.upscale_factors("local:2x-small@1") == (2,)
    with pytest.raises(InvalidUpscaleFactorError, match="Model local:2x-small@1 takes 2; got 3") as refused:
        service.check_factor("local:2x-small@1", 3, schema=False)
    assert refused.value.allowed_values == [2]
    with pytest.raises(InvalidModelError, match="restoration model"):
        service.check_factor("local:1x-denoise@1", 2)
    with pytest.raises(InvalidUpscaleFactorError, match="takes 2; got 4"):
        service.plan(16, 16, 4, "local:2x-small@1")
    plan = service.plan(16, 16, 3, "local:4x-ultrasharp@1")
    assert plan.model.id == "local:4x-ultrasharp@1" and plan.output_size == (48, 48)
    # The manifest's x2 model is held to its scale too (a factor of 4 would only interpolate).
    assert service.upscale_factors("local:realesrgan-x2plus@1") == (2,)


# --------------------------------------------------------------------------- CLI


def test_models_command_shows_each_file_and_why_not(folder: Path) -> None:
    (folder / "broken.pth").write_bytes(b"\x00" * 64)
    result = run_cli("models", "--models-dir", folder)
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "local:4x-ultrasharp@1" in out and "RRDBNet x4, num_block=1 num_feat=4 num_grow_ch=2" in out
    assert "SRVGGNetCompact x1" in out and "restoration" in out
    assert "broken.pth" in out and "not used:" in out


def test_cli_upscales_with_a_dropped_in_model(folder: Path, tmp_path: Path) -> None:
    crop = tmp_path / "in.png"
    photo_crop(20, 12).save(crop)
    out = tmp_path / "out"
    args = ["upscale", crop, "-o", out, "--models-dir", folder, "--device", "cpu"]
    done = run_cli(*args, "--model", "local:4x-ultrasharp@1", "--scale", "3")
    assert done.returncode == 0, done.stderr
    assert (out / "in_x3.png").is_file()
    refused = run_cli(*args, "--model", "local:1x-denoise@1", "--scale", "2")
    assert refused.returncode == 1 and "restoration model" in refused.stderr
    assert_one_line_errors(refused.stderr)


# --------------------------------------------------------------------------- API and playground


def _post(client: Any, task: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = client.post("/v1", json=[task])
    return response.status_code, response.json()


def test_api_serves_dropped_in_models_and_refuses_what_they_cannot_do(folder: Path, tmp_path: Path) -> None:
    image = data_uri(encode(photo_crop(16, 12)))
    settings = resize_settings(tmp_path / "data", models_dir=folder)
    with api_client(settings) as client:
        status, body = _post(client, upscale_task(image, model="local:4x-ultrasharp@1", upscaleFactor=3))
        assert status == 200, body

        drop(folder, "Fresh.safetensors", tiny_srvgg(3))  # while the server runs
        status, body = _post(client, upscale_task(image, model="local:fresh@1", upscaleFactor=3, taskType="upscale"))
        assert status == 200, body

        status, body = _post(client, upscale_task(image, model="local:2x-small@1", upscaleFactor=4))
        assert status == 400
        error = body["errors"][0]
        assert error["code"] == "invalidUpscaleFactor" and error["allowedValues"] == [2]

        status, body = _post(client, upscale_task(image, model="local:1x-denoise@1", upscaleFactor=2))
        assert status == 400 and body["errors"][0]["code"] == "invalidModel"
        assert "restoration" in body["errors"][0]["message"]

        listed = client.get("/playground/models").json()["models"]
        by_id = {model["id"]: model for model in listed}
        assert by_id["local:fresh@1"]["factors"] == [2, 3] and by_id["local:fresh@1"]["scale"] == 3
        assert by_id["local:1x-denoise@1"]["factors"] == []
        assert by_id["runware:504@1"]["factors"] == [2, 3, 4]


def test_real_engine_runs_an_esrgan_layout_file_over_the_api(tmp_path: Path) -> None:
    """The whole path with a network, not the resize engine: an old-layout file dropped in, used by id."""
    folder = tmp_path / "models"
    folder.mkdir()
    old = esrgan_layout(tiny_rrdb(4))
    torch.save(old, folder / "4x-Old.pth")
    assert archs.detect(old)[1].scale == 4

    image = data_uri(encode(photo_crop(16, 12)))
    settings = resize_settings(tmp_path / "data", models_dir=folder, engine="realesrgan", tile_size=0)
    with api_client(settings) as client:
        status, body = _post(
            client, upscale_task(image, model="local:4x-old@1", upscaleFactor=2, outputType="base64Data")
        )
    assert status == 200, body


def test_an_alias_can_name_a_dropped_in_file(folder: Path, tmp_path: Path) -> None:
    """``UPSCALE_MODEL_ALIASES`` may point a Runware id at a file of the models folder; the file is
    looked up when a task names the alias (it may come later), so start-up does not ask for it."""
    image = data_uri(encode(photo_crop(16, 12)))
    aliases = {"runware:502@1": "local:4x-ultrasharp@1", "runware:503@1": "local:later@1"}
    settings = resize_settings(tmp_path / "data", models_dir=folder, model_aliases=aliases)
    with api_client(settings) as client:
        status, body = _post(client, upscale_task(image, model="runware:502@1", upscaleFactor=4))
        assert status == 200, body
        status, body = _post(client, upscale_task(image, model="runware:503@1", upscaleFactor=2))
        assert status == 400 and body["errors"][0]["code"] == "invalidModel", body
        drop(folder, "Later.pth", tiny_rrdb(4))
        status, body = _post(client, upscale_task(image, model="runware:503@1", upscaleFactor=2))
        assert status == 200, body

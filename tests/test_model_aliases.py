"""Models the server lacks: ``invalidModel`` lists what it has; ``UPSCALE_MODEL_ALIASES`` maps ids to local models."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tests import test_cli as cli_tests
from tests.api_helpers import api_client, data_uri, encode, photo_crop, resize_settings, upscale_task
from upscale_server.app import create_app
from upscale_server.config import Settings, UnusableSettingError, parse_model_aliases

KEY = "alias-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODELS = [
    "runware:504@1",
    "local:realesrgan-x4plus-anime@1",
    "local:realesr-animevideov3@1",
    "local:realesrgan-x2plus@1",
]
ALIASES = "runware:500@1=runware:504@1,runware:501@1=local:realesr-animevideov3@1"
#: Runware's hosted upscalers the ComfyUI nodes and MCP servers offer.
RUNWARE_UPSCALERS = ["runware:500@1", "runware:501@1", "runware:502@1", "runware:503@1"]


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[TestClient]:
    with api_client(resize_settings(tmp_path, api_keys=[KEY])) as client:
        yield client


@pytest.fixture
def aliased(tmp_path: Path) -> Iterator[TestClient]:
    settings = resize_settings(tmp_path, api_keys=[KEY], model_aliases=parse_model_aliases(ALIASES))
    with api_client(settings) as client:
        yield client


def rest(client: TestClient, task: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = client.post("/v1", json=[task], headers=AUTH)
    return response.status_code, response.json()


def ws(client: TestClient, task: dict[str, Any]) -> dict[str, Any]:
    with client.websocket_connect("/v1") as socket:
        socket.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
        assert "data" in json.loads(socket.receive_text())
        socket.send_text(json.dumps([task]))
        frame: dict[str, Any] = json.loads(socket.receive_text())
        return frame


def small_task(**fields: Any) -> dict[str, Any]:
    return upscale_task(data_uri(encode(photo_crop())), outputType="base64Data", **fields)


# --------------------------------------------------------------------------- the setting


def test_the_setting_parses_pairs_and_is_off_by_default() -> None:
    assert Settings().model_aliases == {}
    assert parse_model_aliases(" runware:500@1 = runware:504@1 ,, ") == {"runware:500@1": "runware:504@1"}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("UPSCALE_MODEL_ALIASES", ALIASES)
        assert Settings().model_aliases == {
            "runware:500@1": "runware:504@1",
            "runware:501@1": "local:realesr-animevideov3@1",
        }


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("runware:500@1", "malformed entry"),
        ("runware:500@1=", "malformed entry"),
        ("=runware:504@1", "malformed entry"),
        ("runware:500@1=runware:504@1=x", "malformed entry"),
        ("runware:500@1=runware:504@1,runware:500@1=runware:504@1", "aliased twice"),
    ],
)
def test_bad_aliases_are_refused(value: str, fragment: str) -> None:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("UPSCALE_MODEL_ALIASES", value)
        with pytest.raises(ValidationError, match=fragment):
            Settings()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("runware:500@1=runware:999@1", "unknown model 'runware:999@1'"),
        ("runware:504@1=local:realesrgan-x2plus@1", "a model of this server already"),
        ("local:mine@1=runware:504@1", "namespace of this server's local models"),
    ],
)
def test_aliases_the_manifest_cannot_honour_stop_the_app(value: str, fragment: str) -> None:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("UPSCALE_MODEL_ALIASES", value)
        settings = Settings()  # the form is right; the manifest is asked when the app is built
    with pytest.raises(UnusableSettingError, match=fragment):
        create_app(settings)


def run_cli(*args: str | Path, aliases: str) -> subprocess.CompletedProcess[str]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("UPSCALE_MODEL_ALIASES", aliases)
        return cli_tests.run_cli(*args)


def test_a_bad_alias_stops_start_up_with_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--port", "0", "--engine", "resize", "--data-dir", tmp_path, aliases="runware:500@1=nope")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("upscale-server: error: invalid setting model_aliases"), lines
    assert "UPSCALE_MODEL_ALIASES" in lines[0] and "'nope'" in lines[0]


def test_models_command_shows_the_aliases() -> None:
    result = run_cli("models", aliases=ALIASES)
    assert result.returncode == 0, result.stderr
    assert "UPSCALE_MODEL_ALIASES" in result.stdout
    rows = [line for line in result.stdout.splitlines() if "runware:501@1" in line]
    assert rows and "local:realesr-animevideov3@1" in rows[0]


# --------------------------------------------------------------------------- requests


@pytest.mark.parametrize("model", RUNWARE_UPSCALERS)
def test_runware_upscalers_get_invalid_model_listing_the_local_ones_rest(plain: TestClient, model: str) -> None:
    task = small_task(model=model)
    status, body = rest(plain, task)
    assert status == 400 and "data" not in body
    error = body["errors"][0]
    assert (error["code"], error["parameter"], error["taskUUID"]) == ("invalidModel", "model", task["taskUUID"])
    assert error["allowedValues"] == MODELS
    assert model in error["message"]


def test_runware_upscalers_get_invalid_model_listing_the_local_ones_ws(plain: TestClient) -> None:
    task = small_task(model="runware:502@1")
    error = ws(plain, task)["errors"][0]
    assert (error["code"], error["parameter"], error["taskUUID"]) == ("invalidModel", "model", task["taskUUID"])
    assert error["allowedValues"] == MODELS


def test_an_alias_runs_its_local_model_under_the_requests_identity(aliased: TestClient) -> None:
    task = small_task(model="runware:501@1")
    status, body = rest(aliased, task)
    assert status == 200, body
    item = body["data"][0]
    # The answer is the local model's result, under the request's own taskType and taskUUID.
    assert (item["taskType"], item["taskUUID"]) == ("imageUpscale", task["taskUUID"])
    assert "model" not in item and "imageBase64Data" in item
    frame = ws(aliased, small_task(model="runware:500@1", taskType="upscale", inputs=None))
    assert frame["data"][0]["taskType"] == "upscale"


def test_unaliased_ids_list_models_and_aliases(aliased: TestClient) -> None:
    task = small_task(model="runware:503@1")
    status, body = rest(aliased, task)
    assert status == 400
    assert body["errors"][0]["allowedValues"] == [*MODELS, "runware:500@1", "runware:501@1"]
    assert ws(aliased, small_task(model="runware:503@1"))["errors"][0]["code"] == "invalidModel"

"""Test-target mode: the resize engine behind the real API, the ``upscale_server`` fixture, and the example.

What a pipeline testing its Runware integration relies on: the test-target server answers like the
real one (exact factor sizes, formats, alpha, the same error items), deterministically, and starts
with no weights at all. The error items are compared with a real-engine app in the same process, so
"identical" means identical, not "looks similar". The official ``runware-sdk`` drives it over REST,
and ``examples/test_my_app.py`` (the documented user example) runs as a user would run it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api_helpers import data_uri, encode, photo_crop
from tests.conftest import REPO, make_registry
from upscale_server.app import create_app
from upscale_server.config import Settings
from upscale_server.inference.engine import resize as resize_engine
from upscale_server.inference.engine.resize import ResizeUpscaler
from upscale_server.inference.weights.manifest import load_manifest

if TYPE_CHECKING:
    from upscale_server.testing import UpscaleTestServer

# Loads the plugin (a no-op once the package's pytest11 entry point, named "upscale_server.testing", is
# installed). upscale_server.testing is imported only inside tests below: importing it here, before pytest
# registers it, would keep pytest from rewriting its asserts and warn about it.
pytest_plugins = ["upscale_server.testing"]

SDK_PYTHON = REPO / ".venv-sdk-runware-sdk" / "bin" / "python"
SDK_CLIENT = REPO / "tests" / "e2e" / "clients" / "runware_sdk_client.py"
EXAMPLE = REPO / "examples" / "test_my_app.py"
PIL_FORMAT = {"PNG": "PNG", "JPG": "JPEG", "WEBP": "WEBP"}


# --------------------------------------------------------------------------- the engine alone


def test_resize_engine_keeps_the_engine_contract() -> None:
    rgb = np.random.default_rng(7).random((13, 21, 3), dtype=np.float32)
    calls: list[tuple[int, int]] = []
    for scale in (1, 2, 3, 4):
        engine = ResizeUpscaler(scale)
        out = engine.upscale(rgb, progress=lambda done, total: calls.append((done, total)))
        assert out.shape == (13 * scale, 21 * scale, 3)
        assert out.dtype == np.float32 and out.flags.c_contiguous
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert np.array_equal(out, engine.upscale(rgb)), "the same input must give the same pixels"
        assert engine.tile_size_for(13, 21) == 21
    assert calls == [(1, 1)] * 4
    # a flat image stays flat: the resize adds nothing of its own
    flat = ResizeUpscaler(4).upscale(np.full((5, 7, 3), 0.25, dtype=np.float32))
    assert np.allclose(flat, 0.25, atol=1e-6)


def test_resize_delay_holds_the_worker_thread_for_the_configured_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """``UPSCALE_RESIZE_DELAY_SECONDS`` makes each upscale take a while, as a network would (no real sleep here)."""
    slept: list[float] = []
    monkeypatch.setattr(resize_engine.time, "sleep", slept.append)
    rgb = np.zeros((4, 4, 3), dtype=np.float32)
    assert ResizeUpscaler(2, delay_seconds=2.5).upscale(rgb).shape == (8, 8, 3)
    assert ResizeUpscaler(2).upscale(rgb).shape == (8, 8, 3)
    assert slept == [2.5]
    with pytest.raises(ValueError, match="delay_seconds"):
        ResizeUpscaler(2, delay_seconds=-1)
    registry = make_registry(Settings(engine="resize", device="cpu", resize_delay_seconds=7))
    assert registry.upscaler(registry.spec(None)).delay_seconds == 7  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 3), dtype=np.float64),
        np.zeros((4, 4), dtype=np.float32),
        np.full((4, 4, 3), 2.0, dtype=np.float32),
        np.zeros((0, 4, 3), dtype=np.float32),
    ],
)
def test_resize_engine_rejects_what_the_real_engine_rejects(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        ResizeUpscaler(2).upscale(bad)


def test_registry_in_resize_mode_never_touches_the_weight_store(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    registry = make_registry(Settings(engine="resize", models_dir=models, device="cpu"))

    def forbidden(*args: object, **kwargs: object) -> Any:
        raise AssertionError("the weight store was used in test-target mode")

    registry.store.ensure = forbidden  # type: ignore[method-assign]
    registry.store.status = forbidden  # type: ignore[method-assign]
    for spec in load_manifest().models:
        assert registry.status(spec).ready
        upscaler = registry.upscaler(spec)
        assert isinstance(upscaler, ResizeUpscaler) and upscaler.scale == spec.scale
        assert registry.upscaler(spec) is upscaler
    assert list(models.iterdir()) == []


# --------------------------------------------------------------------------- the server, through REST


def post(server: UpscaleTestServer, tasks: list[dict[str, Any]], key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or server.api_key}"}
    return httpx.post(server.rest_url, json=tasks, headers=headers, timeout=60)


def upscale(server: UpscaleTestServer, image: str, **fields: Any) -> dict[str, Any]:
    task = {"taskType": "imageUpscale", "taskUUID": str(uuid.uuid4()), "inputImage": image, "upscaleFactor": 2}
    task.update(fields)
    response = post(server, [task])
    assert response.status_code == 200, response.text
    item: dict[str, Any] = response.json()["data"][0]
    return item


def image_bytes(item: dict[str, Any]) -> bytes:
    return base64.b64decode(item["imageBase64Data"])


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_exact_factor_sizes(upscale_server: UpscaleTestServer, factor: int) -> None:
    source = data_uri(encode(photo_crop(37, 23)))
    item = upscale(upscale_server, source, upscaleFactor=factor, outputType="base64Data", outputFormat="PNG")
    assert open_image(image_bytes(item)).size == (37 * factor, 23 * factor)


def test_output_cap_shrinks_the_input_like_the_real_server(upscale_server: UpscaleTestServer) -> None:
    """A 1500x300 input at x4 would be 6000 px wide: the input shrinks so the output fits 4096."""
    source = data_uri(encode(Image.new("RGB", (1500, 300), (90, 120, 200))))
    item = upscale(upscale_server, source, upscaleFactor=4, outputType="base64Data", outputFormat="JPG")
    assert open_image(image_bytes(item)).size == (4096, 816)


@pytest.mark.parametrize("output_format", ["PNG", "JPG", "WEBP"])
def test_formats_and_url_output(upscale_server: UpscaleTestServer, output_format: str) -> None:
    item = upscale(upscale_server, data_uri(encode(photo_crop())), outputFormat=output_format)
    assert item["imageURL"].startswith(upscale_server.url + "/image/")
    response = httpx.get(item["imageURL"], timeout=30)
    assert response.status_code == 200
    image = open_image(response.content)
    assert image.format == PIL_FORMAT[output_format]
    assert image.size == (48, 32)


def test_rgba_png_keeps_its_alpha(upscale_server: UpscaleTestServer) -> None:
    rgba = Image.new("RGBA", (20, 10), (200, 40, 40, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 10))  # left half fully transparent
    item = upscale(upscale_server, data_uri(encode(rgba)), outputType="base64Data", outputFormat="PNG")
    out = open_image(image_bytes(item))
    assert out.mode == "RGBA" and out.size == (40, 20)
    alpha = np.asarray(out)[..., 3]
    assert alpha[:, :16].max() <= 8, "the transparent half stays transparent"
    assert alpha[:, 24:].min() >= 247, "the opaque half stays opaque"


def test_same_input_gives_identical_bytes(upscale_server: UpscaleTestServer) -> None:
    source = data_uri(encode(photo_crop(31, 17)))
    for output_format in ("PNG", "JPG", "WEBP"):
        first, second = (
            image_bytes(upscale(upscale_server, source, upscaleFactor=3, outputType="base64Data", outputFormat=fmt))
            for fmt in (output_format, output_format)
        )
        assert first == second, f"{output_format} output differs between two identical requests"


def test_wrong_key_is_refused(upscale_server: UpscaleTestServer) -> None:
    response = post(upscale_server, [{"taskType": "ping", "ping": True}], key="not-the-key")
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "invalidApiKey"


BAD_TASKS = {
    "invalidModel": {"model": "runware:999@1"},
    "invalidUpscaleFactor": {"upscaleFactor": 5},
    "invalidOutputFormat": {"outputFormat": "GIF"},
}


@pytest.fixture(scope="module")
def real_engine_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app with the real engine (default settings), to compare error items with."""
    root = tmp_path_factory.mktemp("real-engine")
    (root / "models").mkdir()
    settings = Settings(data_dir=root / "data", models_dir=root / "models", device="cpu", preload_default_model=False)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("code", sorted(BAD_TASKS))
def test_errors_are_identical_to_the_real_engine(
    upscale_server: UpscaleTestServer, real_engine_client: TestClient, code: str
) -> None:
    task = {
        "taskType": "imageUpscale",
        "taskUUID": str(uuid.uuid4()),
        "inputImage": data_uri(encode(photo_crop())),
        "upscaleFactor": 2,
        **BAD_TASKS[code],
    }
    target = post(upscale_server, [task])
    task["taskUUID"] = str(uuid.uuid4())
    real = real_engine_client.post("/v1", json=[task], headers={"Authorization": "Bearer any"})
    assert target.status_code == real.status_code == 400
    target_error, real_error = target.json()["errors"][0], real.json()["errors"][0]
    assert target_error["code"] == code
    target_error.pop("taskUUID")
    real_error.pop("taskUUID")
    assert target_error == real_error


def test_starts_with_an_empty_models_folder_and_no_weights(tmp_path: Path) -> None:
    """Test-target mode needs no weights: the server is ready (``/ready``: the default model is loaded) with an
    empty models folder, serves it with the resize engine, never loads a network, and writes nothing into the
    folder. What would make start-up slow (converting or loading weights) is asserted absent, rather than
    timing a start-up on a shared machine."""
    from upscale_server.testing import run_test_server

    models = tmp_path / "models"
    models.mkdir()
    with run_test_server(data_dir=tmp_path / "server", models_dir=models) as server:
        ready = httpx.get(f"{server.url}/ready", timeout=30)
        assert ready.status_code == 200 and ready.json()["checks"]["model"] == "loaded", ready.text
        item = upscale(server, data_uri(encode(photo_crop())), upscaleFactor=4, outputType="base64Data")
        assert open_image(image_bytes(item)).size == (96, 64)
        log = server.log()
        assert "resize engine" in log
        assert not re.search(r"loaded \S+ \(.*\) from ", log), "a network was loaded in test-target mode"
    assert list(models.iterdir()) == [], "test-target mode must not provision weights"
    assert server.process.returncode is not None, "the server must be stopped after the with block"


# --------------------------------------------------------------------------- the official SDK


def sdk_python() -> Path:
    if not SDK_PYTHON.exists():
        pytest.fail("PyPI runware-sdk==1.8.0 (.venv-sdk-runware-sdk) is not installed: run scripts/setup-sdks")
    return SDK_PYTHON


@pytest.mark.e2e  # drives the official SDK in its own venv
def test_official_sdk_over_rest(upscale_server: UpscaleTestServer, tmp_path: Path) -> None:
    """runware-sdk's REST transport, through the e2e client program: an upload, an upscale, an error."""
    source = data_uri(encode(photo_crop(24, 16)))
    plan = {
        "steps": [
            {"name": "up", "op": "image_upload", "args": {"image": source}},
            {
                "name": "x2",
                "op": "run",
                "args": {
                    "taskType": "upscale",
                    "model": "runware:504@1",
                    "inputs": {"image": "${up.imageUUID}"},
                    "upscaleFactor": 2,
                    "outputType": "base64Data",
                    "outputFormat": "PNG",
                },
            },
            {  # the model's schema takes 2 or 4 for the `upscale` task, as Runware's does
                "name": "x3",
                "op": "run",
                "args": {
                    "taskType": "upscale",
                    "model": "runware:504@1",
                    "inputs": {"image": "${up.imageUUID}"},
                    "upscaleFactor": 3,
                },
            },
            {
                "name": "bad",
                "op": "run",
                "args": {"taskType": "upscale", "model": "runware:999@1", "inputs": {"image": source}},
            },
        ]
    }
    command = [str(sdk_python()), str(SDK_CLIENT), "--transport", "rest", "--url", upscale_server.rest_url]
    process = subprocess.run(
        [*command, "--api-key", upscale_server.api_key],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    steps = json.loads(process.stdout)["steps"]
    assert steps["up"]["ok"], steps["up"]
    assert steps["x2"]["ok"], steps["x2"]
    out = open_image(base64.b64decode(steps["x2"]["result"][0]["imageBase64Data"]))
    assert out.size == (48, 32)
    assert not steps["x3"]["ok"] and steps["x3"]["error"]["parameter"] == "upscaleFactor", steps["x3"]
    assert not steps["bad"]["ok"]
    assert steps["bad"]["error"]["parameter"] == "model"


@pytest.mark.e2e  # runs the user's example with pytest in the SDK's venv
def test_the_documented_example_passes(tmp_path: Path) -> None:
    """``examples/test_my_app.py`` runs as docs/test-target.md says, in the SDK's own environment.

    The SDK venv has no torch, so the server runs with this interpreter (``UPSCALE_TEST_SERVER_PYTHON``)
    and the plugin, which needs only the standard library, is imported from the checkout.
    """
    python = sdk_python()
    has_pytest = subprocess.run([str(python), "-c", "import pytest"], capture_output=True, check=False)
    if has_pytest.returncode != 0:
        pytest.fail("pytest is missing from the runware-sdk venv: run scripts/setup-sdks", pytrace=False)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "server"),
        "UPSCALE_TEST_SERVER_PYTHON": sys.executable,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [
        str(python),
        "-m",
        "pytest",
        "-p",
        "upscale_server.testing",
        str(EXAMPLE),
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    process = subprocess.run(
        [*command, "--basetemp", str(tmp_path / "basetemp"), "--rootdir", str(EXAMPLE.parent)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-2000:]
    assert " passed" in process.stdout

"""The pytest side of the SDK tests: run a client program, and check what the SDK handed back.

``tests/e2e/test_sdks.py`` drives the official Runware SDKs through the client programs next to this
file (``runware_client.py``, ``runware_sdk_client.py``) and ``tests/e2e/js/client.mjs``, one adapter
per SDK and transport (``adapters.py``). Each program runs a *plan* of steps in one process (starting
an SDK and connecting is the slow part) and prints one JSON report (format in ``_plan.py``); the tests
assert on the steps of that report, and on the images behind it: downloaded from ``imageURL`` or
decoded from ``imageBase64Data``/``imageDataURI``.

The SDKs are installed by ``scripts/setup-sdks`` (``scripts/test`` runs it first). A missing SDK is a
test *failure* that says so, never a skip.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from PIL import Image, ImageChops, ImageStat

if TYPE_CHECKING:
    from upscale_server.testing import UpscaleTestServer

REPO = Path(__file__).resolve().parents[3]
CLIENTS = Path(__file__).resolve().parent
JS_DIR = REPO / "tests" / "e2e" / "js"
PHOTO = REPO / "tests" / "data" / "photo_grace_hopper.jpg"

RUNWARE_PYTHON = REPO / ".venv-sdk-runware" / "bin" / "python"
RUNWARE_SDK_PYTHON = REPO / ".venv-sdk-runware-sdk" / "bin" / "python"
JS_SDK_PACKAGE = JS_DIR / "node_modules" / "@runware" / "sdk-js" / "package.json"

#: The model most cases name, and the server's default (RealESRGAN_x4plus): both served by the resize engine.
FAST_MODEL = "local:realesr-animevideov3@1"
DEFAULT_MODEL = "runware:504@1"
#: A UUID no server has stored.
UNKNOWN_UUID = "0b9a6a8e-4f5c-4d0a-9a51-7c1f3e2d9b00"
#: Generous bound for one client process (connect + every step of its plan + disconnect).
CLIENT_TIMEOUT_S = 300

PIL_FORMAT = {"JPG": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}
MIME = {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
OUTPUT_FIELD = {"URL": "imageURL", "base64Data": "imageBase64Data", "dataURI": "imageDataURI"}


def missing_sdk(what: str) -> None:
    """Fail (never skip) with the one command that fixes it."""
    pytest.fail(f"{what} is not installed: run scripts/setup-sdks (scripts/test runs it first)", pytrace=False)


def runware_command() -> list[str]:
    """The PyPI ``runware`` 0.5.24 client, in its own venv."""
    if not RUNWARE_PYTHON.exists():
        missing_sdk("PyPI runware==0.5.24 (.venv-sdk-runware)")
    return [str(RUNWARE_PYTHON), str(CLIENTS / "runware_client.py")]


def runware_sdk_command() -> list[str]:
    """The PyPI ``runware-sdk`` 1.8.0 client, in its own venv."""
    if not RUNWARE_SDK_PYTHON.exists():
        missing_sdk("PyPI runware-sdk==1.8.0 (.venv-sdk-runware-sdk)")
    return [str(RUNWARE_SDK_PYTHON), str(CLIENTS / "runware_sdk_client.py")]


def js_command() -> list[str]:
    """The npm ``@runware/sdk-js`` 1.3.2 client, run by node."""
    node = shutil.which("node")
    if node is None:
        missing_sdk("node (Node.js 20+)")
    if not JS_SDK_PACKAGE.exists():
        missing_sdk("npm @runware/sdk-js@1.3.2 (tests/e2e/js/node_modules)")
    return [str(node), str(JS_DIR / "client.mjs")]


def run_client(command: list[str], plan: dict[str, Any]) -> dict[str, Any]:
    """Run a client with ``plan`` on stdin; return its JSON report (fail with its stderr otherwise)."""
    try:
        process = subprocess.run(
            command,
            input=json.dumps(plan),
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
            cwd=REPO,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{command[-1]} did not finish within {CLIENT_TIMEOUT_S} s; stderr:\n{exc.stderr}")
    if process.returncode != 0:
        pytest.fail(f"{command[-1]} exited with {process.returncode}; stderr:\n{process.stderr[-4000:]}")
    try:
        report: dict[str, Any] = json.loads(process.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"{command[-1]} did not print one JSON object:\n{process.stdout[-2000:]}")
    return report


def step_result(report: dict[str, Any], name: str) -> Any:
    """The result of a step that must have succeeded (the failure says what the SDK raised)."""
    outcome = report["steps"][name]
    assert outcome["ok"], f"step {name!r} failed in {report['sdk']}: {outcome['error']}"
    return outcome["result"]


def step_error(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The error of a step that must have failed."""
    outcome = report["steps"][name]
    assert not outcome["ok"], f"step {name!r} should have failed in {report['sdk']}, returned {outcome}"
    error: dict[str, Any] = outcome["error"]
    return error


def single(result: Any) -> dict[str, Any]:
    """The one result item: SDKs return a list (Python) or the item itself (JS)."""
    if isinstance(result, list):
        assert len(result) == 1, f"expected one result item, got {len(result)}: {result}"
        result = result[0]
    assert isinstance(result, dict), result
    return result


def assert_uuid(value: object) -> None:
    assert isinstance(value, str), value
    assert str(uuid.UUID(value)) == value.lower(), f"not a canonical UUID: {value!r}"


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class SourceImage:
    """The tiny input every upscale uses, in each form a client can send it."""

    path: Path
    png: bytes
    image: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def base64(self) -> str:
        return base64.b64encode(self.png).decode()

    @property
    def data_uri(self) -> str:
        return f"data:image/png;base64,{self.base64}"


def make_source(directory: Path) -> SourceImage:
    """A 24x16 RGB crop of the Grace Hopper photo (a sharp white/black edge), saved as PNG.

    Tiny, so every upscale and download is quick; with an edge, so a wrong, flipped or blank result
    fails :func:`assert_same_picture`.
    """
    image = Image.open(PHOTO).convert("RGB").crop((296, 392, 320, 408))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = directory / "source-24x16.png"
    path.write_bytes(buffer.getvalue())
    return SourceImage(path=path, png=buffer.getvalue(), image=image)


def fetch(url: str, server: UpscaleTestServer) -> bytes:
    """Download an ``imageURL``: it must be served by this server and answer 200."""
    assert url.startswith(server.url + "/"), f"imageURL {url!r} is not on the server {server.url}"
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, f"GET {url} -> {response.status_code} {response.text[:200]}"
    return response.content


def output_bytes(item: dict[str, Any], output_type: str, output_format: str, server: UpscaleTestServer) -> bytes:
    """The image bytes behind a result item, from the field ``output_type`` selects."""
    field = OUTPUT_FIELD[output_type]
    value = item.get(field)
    assert isinstance(value, str) and value, f"result has no {field}: {sorted(item)}"
    if output_type == "URL":
        return fetch(value, server)
    if output_type == "dataURI":
        prefix = f"data:{MIME[output_format]};base64,"
        assert value.startswith(prefix), f"imageDataURI starts with {value[:40]!r}, expected {prefix!r}"
        value = value[len(prefix) :]
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        pytest.fail(f"{field} is not valid base64: {exc}")


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_same_picture(image: Image.Image, source: SourceImage, tolerance: float = 24.0) -> None:
    """``image``, shrunk back to the source size, looks like the source (mean error per channel)."""
    small = image.convert("RGB").resize(source.size, Image.Resampling.BOX)
    error = sum(ImageStat.Stat(ImageChops.difference(small, source.image)).mean) / 3
    assert error < tolerance, f"the result does not look like the input (mean abs error {error:.1f})"


def check_upscaled(
    item: dict[str, Any],
    *,
    server: UpscaleTestServer,
    source: SourceImage,
    factor: int,
    output_type: str = "URL",
    output_format: str = "JPG",
    task_type: str | None = None,
    cost: bool = False,
) -> Image.Image:
    """Assert a result item is ``source`` upscaled ``factor``x, delivered as ``output_type``/``output_format``."""
    assert_uuid(item.get("imageUUID"))
    if task_type is not None:
        assert item.get("taskType") == task_type, item.get("taskType")
    if cost:
        assert isinstance(item.get("cost"), int | float) and not isinstance(item.get("cost"), bool), item
    image = open_image(output_bytes(item, output_type, output_format, server))
    assert image.format == PIL_FORMAT[output_format], f"got {image.format}, asked for {output_format}"
    width, height = source.size
    assert image.size == (width * factor, height * factor), f"got {image.size}, expected {factor}x {source.size}"
    assert_same_picture(image, source)
    return image


def check_uploaded(item: dict[str, Any], *, server: UpscaleTestServer, source: SourceImage) -> None:
    """An ``imageUpload`` answer: a UUID, and an imageURL that serves the uploaded picture."""
    assert_uuid(item.get("imageUUID"))
    image = open_image(fetch(item["imageURL"], server))
    assert image.size == source.size
    assert_same_picture(image, source, tolerance=1.0)


# --------------------------------------------------------------------------- the shared case matrix


@dataclass(frozen=True)
class UpscaleCase:
    """One sync upscale every SDK runs: an input form, a factor, an output type and format, a model.

    ``source`` names the input form: ``uuid`` / ``url`` (the imageUUID / imageURL of an image uploaded
    earlier in the same plan), ``data_uri``, ``base64``. ``output_type``/``output_format`` ``None``
    leave the field out of the request (the server's defaults: URL, JPG); ``model`` ``None`` leaves
    the model out (the server's default, ``runware:504@1``). ``inputs_form`` sends the image as
    ``inputs.image`` instead of ``inputImage``.
    """

    name: str
    source: str
    factor: int
    output_type: str | None
    output_format: str | None
    model: str | None = FAST_MODEL
    inputs_form: bool = False
    include_cost: bool = False

    @property
    def expected_type(self) -> str:
        return self.output_type or "URL"

    @property
    def expected_format(self) -> str:
        return self.output_format or "JPG"

    def options(self) -> dict[str, Any]:
        """The request fields other than the image and taskType, as every SDK spells them."""
        fields: dict[str, Any] = {"upscaleFactor": self.factor}
        if self.model is not None:
            fields["model"] = self.model
        if self.output_type is not None:
            fields["outputType"] = self.output_type
        if self.output_format is not None:
            fields["outputFormat"] = self.output_format
        if self.include_cost:
            fields["includeCost"] = True
        return fields


#: Every input form, every outputType, every outputFormat, and the default model, at least once.
#: An SDK that must name a model (runware-sdk: no registry look-ups) sends ``DEFAULT_MODEL`` for ``None``.
UPSCALE_CASES = [
    UpscaleCase("uuid-url-png", "uuid", 2, "URL", "PNG", include_cost=True),
    UpscaleCase("url-base64-jpg", "url", 2, "base64Data", "JPG"),
    UpscaleCase("datauri-datauri-webp", "data_uri", 3, "dataURI", "WEBP"),
    UpscaleCase("base64-url-webp", "base64", 4, "URL", "WEBP"),
    UpscaleCase("inputs-uuid-base64-png", "uuid", 2, "base64Data", "PNG", inputs_form=True),
    # No model and no output fields: the server's defaults (RealESRGAN_x4plus's id, a URL to a JPG).
    UpscaleCase("default-model-and-output", "uuid", 2, None, None, model=None, include_cost=True),
]


def source_value(source: SourceImage, form: str, upload_step: str = "upload") -> str:
    """The string a plan sends for an input form (``${...}`` refers to the upload step's result)."""
    return {
        "uuid": f"${{{upload_step}.imageUUID}}",
        "url": f"${{{upload_step}.imageURL}}",
        "data_uri": source.data_uri,
        "base64": source.base64,
        "path": str(source.path),
    }[form]

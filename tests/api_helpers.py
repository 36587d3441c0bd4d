"""Shared by the API tests: images as the wire carries them, task dicts, resize-engine settings and a job gate."""

from __future__ import annotations

import base64
import io
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests import cluster_mode
from tests.conftest import PHOTO
from upscale_server.app import create_app
from upscale_server.config import Settings
from upscale_server.inference.engine.resize import ResizeUpscaler


def photo_crop(width: int = 24, height: int = 16, *, left: int = 220, top: int = 200) -> Image.Image:
    with Image.open(PHOTO) as image:
        return image.convert("RGB").crop((left, top, left + width, top + height))


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def new_uuid() -> str:
    return str(uuid.uuid4())


def upscale_task(image: str, **fields: Any) -> dict[str, Any]:
    task = {
        "taskType": "imageUpscale",
        "taskUUID": new_uuid(),
        "inputImage": image,
        "upscaleFactor": 2,
        "model": "local:realesr-animevideov3@1",
    }
    task.update(fields)
    return {key: value for key, value in task.items() if value is not None}


def resize_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for an in-process app whose protocol is under test, not its pixels: the resize engine
    (deterministic, milliseconds, no weights), on the CPU, with nothing loaded at start-up. With
    ``pytest --cluster``, on the session's Redis and S3 (tests/cluster_mode.py)."""
    fields: dict[str, Any] = {"device": "cpu", "engine": "resize", "preload_default_model": False}
    if cluster_mode.TARGET is not None:
        fields.update(cluster_mode.TARGET.settings_for(data_dir))
    return Settings(data_dir=data_dir, **{**fields, **overrides})


def api_client(settings: Settings) -> TestClient:
    """An in-process app for ``settings``; with ``pytest --cluster``, two nodes of one cluster taking
    turns. Use it as a context manager."""
    if settings.redis_url and cluster_mode.TARGET is not None:
        return cluster_mode.TwoNodeClient(settings)  # type: ignore[return-value]
    return TestClient(create_app(settings))


def make_client(data_dir: Path, key: str, **overrides: Any) -> TestClient:
    """An in-process app on the resize engine that accepts ``key``; use it as a context manager."""
    return api_client(resize_settings(data_dir, api_keys=[key], **overrides))


def poll(client: TestClient, task_uuid: str, key: str) -> dict[str, Any]:
    """The ``getResponse`` answer for ``task_uuid``: its data item, or its error item."""
    response = client.post(
        "/v1", json=[{"taskType": "getResponse", "taskUUID": task_uuid}], headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    item: dict[str, Any] = body["data"][0] if "data" in body else body["errors"][0]
    return item


def wait_finished(client: TestClient, task_uuid: str, key: str) -> dict[str, Any]:
    """Poll until the task is no longer processing (its job was let go; bounded by the test's timeout)."""
    while (item := poll(client, task_uuid, key)).get("status") == "processing":
        time.sleep(0.01)
    return item


#: A gated job gives up after this long, so a test that never opens its gate fails instead of hanging.
GATE_TIMEOUT = 60.0


class JobGate:
    """Holds every resize-engine upscale on the inference worker until :meth:`open`.

    A task held here is provably in progress (claimed, queued, running), which is what protocol tests
    used a slow real network for. Use it inside the app's ``with`` block so it opens before the app
    waits for its running tasks at shutdown::

        with TestClient(create_app(settings)) as client, JobGate(monkeypatch) as gate:
            ...
            gate.wait_held()  # a job reached the engine
            gate.open()
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._opened = threading.Event()
        self._held = threading.Semaphore(0)
        original = ResizeUpscaler.upscale

        def held(engine: ResizeUpscaler, rgb: Any, **kwargs: Any) -> Any:
            self._held.release()
            if not self._opened.wait(GATE_TIMEOUT):
                raise TimeoutError("the test never opened its job gate")
            return original(engine, rgb, **kwargs)

        monkeypatch.setattr(ResizeUpscaler, "upscale", held)

    def wait_held(self, count: int = 1, timeout: float = 30.0) -> None:
        """Block until ``count`` more jobs are being held."""
        for _ in range(count):
            assert self._held.acquire(timeout=timeout), "no job reached the engine"

    def open(self) -> None:
        self._opened.set()

    def __enter__(self) -> JobGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()

"""Decoding and encoding run in the app's codec pool: never on the inference worker, never on the event loop."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api_helpers import b64, decode, encode, new_uuid, photo_crop, resize_settings, upscale_task
from upscale_server import app as app_module
from upscale_server import imaging
from upscale_server.app import create_app
from upscale_server.inference.pipeline import UpscalePipeline
from upscale_server.tasks import images

KEY = "codec-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def recording(calls: list[tuple[str, str]], label: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append((label, threading.current_thread().name))
        return func(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("output_format", ["PNG", "JPG", "WEBP"])
def test_codecs_run_in_the_pool_and_inference_on_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output_format: str
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(images, "decode_image", recording(calls, "decode", images.decode_image))
    monkeypatch.setattr(images, "encode_image", recording(calls, "encode", images.encode_image))
    monkeypatch.setattr(imaging, "_write_png", recording(calls, "png", imaging._write_png))
    monkeypatch.setattr(UpscalePipeline, "run", recording(calls, "inference", UpscalePipeline.run))
    pools: list[ThreadPoolExecutor] = []

    class RecordedPool(ThreadPoolExecutor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(app_module, "ThreadPoolExecutor", RecordedPool)
    app = create_app(resize_settings(tmp_path, api_keys=[KEY], encode_workers=2))
    with TestClient(app) as client:
        [codecs] = pools
        assert codecs._max_workers == 2
        gif = encode(photo_crop(12, 8), "GIF")  # not kept as sent: the stored input is encoded to PNG
        task = upscale_task(b64(gif), outputType="base64Data", outputFormat=output_format)
        response = client.post("/v1", json=[task], headers=AUTH)
        assert response.status_code == 200, response.text
        item = response.json()["data"][0]
        assert decode(base64.b64decode(item["imageBase64Data"])).size == (24, 16)
        assert client.get(f"/image/{item['inputImageUUID']}.png", headers=AUTH).status_code == 200
    assert {label for label, _ in calls} >= {"decode", "encode", "png", "inference"}
    for label, thread in calls:
        if label == "inference":
            assert thread == "inference-worker"
        else:
            assert thread.startswith("codec"), (label, thread)
    with pytest.raises(RuntimeError):  # the app shut its pool down on exit
        codecs.submit(lambda: None)


def test_upload_decodes_and_encodes_in_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(images, "decode_image", recording(calls, "decode", images.decode_image))
    monkeypatch.setattr(images, "encode_image", recording(calls, "encode", images.encode_image))
    with TestClient(create_app(resize_settings(tmp_path, api_keys=[KEY]))) as client:
        image = "data:image/png;base64," + b64(encode(photo_crop(8, 8)))
        response = client.post(
            "/v1", json=[{"taskType": "imageUpload", "taskUUID": new_uuid(), "image": image}], headers=AUTH
        )
        assert response.status_code == 200, response.text
    assert [label for label, _ in calls] == ["decode", "encode"]
    assert all(thread.startswith("codec") for _, thread in calls)


def test_a_failed_inference_fails_only_its_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The input is stored while the network runs; a failed network fails the task, not the server."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("network exploded")

    monkeypatch.setattr(UpscalePipeline, "run", broken)
    with TestClient(create_app(resize_settings(tmp_path, api_keys=[KEY]))) as client:
        response = client.post("/v1", json=[upscale_task(b64(encode(photo_crop(8, 8))))], headers=AUTH)
        errors = response.json()["errors"]
        assert len(errors) == 1 and errors[0]["taskType"] == "imageUpscale"
        ping = client.post("/v1", json=[{"taskType": "ping", "ping": True}], headers=AUTH)
        assert ping.status_code == 200

"""REST ``POST /v1`` and image serving through the real app (TestClient runs the lifespan)."""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api_helpers import (
    JobGate,
    api_client,
    b64,
    data_uri,
    decode,
    encode,
    new_uuid,
    photo_crop,
    resize_settings,
    upscale_task,
    wait_finished,
)
from upscale_server.config import Settings
from upscale_server.storage import StoredImage
from upscale_server.storage.local_images import LocalImageStore

KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    return resize_settings(data_dir, api_keys=[KEY], **overrides)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with api_client(make_settings(tmp_path)) as test_client:
        yield test_client


def post(client: TestClient, tasks: Any, headers: dict[str, str] | None = AUTH) -> tuple[int, dict[str, Any]]:
    response = client.post("/v1", json=tasks, headers=headers or {})
    return response.status_code, response.json()


def upload(client: TestClient, image: Image.Image, fmt: str = "PNG") -> dict[str, Any]:
    status, body = post(
        client, [{"taskType": "imageUpload", "taskUUID": new_uuid(), "image": data_uri(encode(image, fmt))}]
    )
    assert status == 200, body
    item: dict[str, Any] = body["data"][0]
    return item


def fetch_image(client: TestClient, url: str) -> tuple[Image.Image, str]:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return decode(response.content), response.headers["content-type"]


def test_ping_and_keys(client: TestClient) -> None:
    assert post(client, [{"taskType": "ping", "ping": True}]) == (200, {"data": [{"taskType": "ping", "pong": True}]})
    status, body = post(client, [{"taskType": "ping", "ping": True}], headers={"Authorization": "Bearer nope"})
    assert status == 401
    assert body["errors"][0]["code"] == "invalidApiKey"
    assert body["errors"][0]["taskType"] == "authentication"
    assert "data" not in body
    in_body = [{"taskType": "authentication", "apiKey": KEY}, {"taskType": "ping", "ping": True}]
    assert post(client, in_body, headers=None) == (200, {"data": [{"taskType": "ping", "pong": True}]})
    status, body = post(client, [{"taskType": "ping", "ping": True}], headers=None)
    assert status == 401 and body["errors"][0]["code"] == "missingApiKey"


def test_open_mode_accepts_any_key(tmp_path: Path) -> None:
    with api_client(resize_settings(tmp_path)) as open_client:
        status, _ = post(open_client, [{"taskType": "ping", "ping": True}], headers={"Authorization": "Bearer any"})
        assert status == 200


def test_upload_is_stored_at_most_2048_with_exif_applied(client: TestClient) -> None:
    wide = photo_crop(64, 32).resize((3000, 1000))
    item = upload(client, wide)
    assert set(item) == {"taskType", "taskUUID", "imageUUID", "imageURL"}
    stored, content_type = fetch_image(client, item["imageURL"])
    assert stored.size == (2048, 683) and content_type == "image/png"

    rotated = photo_crop(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    status, body = post(
        client,
        [{"taskType": "imageUpload", "taskUUID": new_uuid(), "image": b64(encode(rotated, "JPEG", exif=exif))}],
    )
    assert status == 200
    stored, content_type = fetch_image(client, body["data"][0]["imageURL"])
    assert stored.size == (20, 40) and content_type == "image/jpeg"


def test_upscale_by_upload_uuid_returns_the_documented_item(client: TestClient) -> None:
    uploaded = upload(client, photo_crop())
    task = upscale_task(uploaded["imageUUID"], outputType="URL", outputFormat="png", upscaleFactor=3)
    status, body = post(client, [task])
    assert status == 200 and "errors" not in body
    item = body["data"][0]
    assert item["taskType"] == "imageUpscale" and item["taskUUID"] == task["taskUUID"]
    assert item["inputImageUUID"] == uploaded["imageUUID"]
    assert item["imageUUID"] != uploaded["imageUUID"]
    assert "cost" not in item
    image, content_type = fetch_image(client, item["imageURL"])
    assert image.size == (72, 48) and content_type == "image/png"


@pytest.mark.parametrize(
    ("output_type", "output_format", "pil_format"),
    [("base64Data", "WEBP", "WEBP"), ("dataURI", "JPG", "JPEG"), ("URL", None, "JPEG")],
)
def test_unified_upscale_task_with_each_output_type(
    client: TestClient, output_type: str, output_format: str | None, pil_format: str
) -> None:
    task = {
        "taskType": "upscale",
        "taskUUID": new_uuid(),
        "model": "local:realesr-animevideov3@1",
        "inputs": {"image": b64(encode(photo_crop()))},
        "upscaleFactor": 2,
        "outputType": output_type,
        "outputFormat": output_format,
        "includeCost": True,
    }
    status, body = post(client, [{k: v for k, v in task.items() if v is not None}])
    assert status == 200, body
    item = body["data"][0]
    assert item["taskType"] == "upscale" and item["cost"] == 0
    if output_type == "base64Data":
        data = base64.b64decode(item["imageBase64Data"])
    elif output_type == "dataURI":
        header, _, payload = item["imageDataURI"].partition(",")
        assert header == "data:image/jpeg;base64"
        data = base64.b64decode(payload)
    else:
        data = client.get(item["imageURL"]).content
    image = decode(data)
    assert image.format == pil_format and image.size == (48, 32)
    assert {k for k in item if k.startswith("image")} == {
        "imageUUID",
        *{"URL": ["imageURL"], "base64Data": ["imageBase64Data"], "dataURI": ["imageDataURI"]}[output_type],
    }


def test_outputs_are_reusable_inputs(client: TestClient) -> None:
    first = post(client, [upscale_task(data_uri(encode(photo_crop(12, 8))))])[1]["data"][0]
    status, body = post(client, [upscale_task(first["imageUUID"], outputFormat="PNG")])
    assert status == 200
    assert body["data"][0]["inputImageUUID"] == first["imageUUID"]
    image, _ = fetch_image(client, body["data"][0]["imageURL"])
    assert image.size == (48, 32)


def test_transparency_survives_png_and_webp_and_is_flattened_in_jpg(client: TestClient, clipart_path: Path) -> None:
    rgba = Image.open(clipart_path).convert("RGBA").resize((32, 32))
    source = data_uri(encode(rgba))
    for fmt, mode in (("PNG", "RGBA"), ("WEBP", "RGBA"), ("JPG", "RGB")):
        status, body = post(client, [upscale_task(source, outputFormat=fmt)])
        assert status == 200, body
        image, _ = fetch_image(client, body["data"][0]["imageURL"])
        assert image.mode == mode and image.size == (64, 64), fmt
        if mode == "RGBA":
            assert image.getextrema()[3][0] == 0  # fully transparent pixels remain


def test_async_delivery_and_get_response(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    task = upscale_task(data_uri(encode(photo_crop(96, 96))), deliveryMethod="async", model=None, upscaleFactor=4)
    poll = [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}]
    with JobGate(monkeypatch) as gate:
        status, body = post(client, [task])
        assert status == 200
        assert body == {"data": [{"taskType": "imageUpscale", "taskUUID": task["taskUUID"]}]}
        gate.wait_held()
        status, body = post(client, poll)
        assert status == 200, body
        item = body["data"][0]
        assert item == {"taskType": "imageUpscale", "taskUUID": task["taskUUID"], "status": "processing"}
        assert not any(k.endswith(("URL", "Base64Data", "DataURI")) for k in item)
    item = wait_finished(client, task["taskUUID"], KEY)
    assert item["status"] == "success" and item["taskType"] == "imageUpscale"
    image, _ = fetch_image(client, item["imageURL"])
    assert image.size == (384, 384)


@pytest.mark.parametrize("output_type", ["URL", "base64Data", "dataURI"])
def test_sync_results_are_pollable_and_task_uuids_unique(client: TestClient, output_type: str) -> None:
    task = upscale_task(data_uri(encode(photo_crop())), outputType=output_type, outputFormat="PNG")
    status, first = post(client, [task])
    assert status == 200
    status, polled = post(client, [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
    assert polled["data"][0] == {**first["data"][0], "status": "success"}
    status, again = post(client, [task])
    assert status == 409
    assert again["errors"][0]["code"] == "conflictTaskUUID"
    assert again["errors"][0]["taskUUID"] == task["taskUUID"]


def test_tasks_of_one_array_fail_independently(client: TestClient) -> None:
    good = upscale_task(data_uri(encode(photo_crop())))
    bad = upscale_task(data_uri(encode(photo_crop())), upscaleFactor=5)
    status, body = post(client, [good, bad])
    assert status == 200
    assert [item["taskUUID"] for item in body["data"]] == [good["taskUUID"]]
    error = body["errors"][0]
    assert error["taskUUID"] == bad["taskUUID"] and error["parameter"] == "upscaleFactor"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalidRequest"),
        (b'{"taskType": "ping"}', 400, "invalidRequest"),  # Runware takes arrays only
        (b"[]", 400, "invalidRequest"),
        (
            b'[{"taskType": "imageInference", "taskUUID": "0b8e6c87-7d7d-4c39-8f5a-2f4f0b8f7c11"}]',
            400,
            "invalidTaskType",
        ),
        (b"[42]", 400, "invalidRequest"),
    ],
)
def test_malformed_bodies_get_runware_errors(client: TestClient, body: bytes, status: int, code: str | None) -> None:
    response = client.post("/v1", content=body, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == status, response.text
    payload = response.json()
    if code is None:
        assert "errors" not in payload
    else:
        assert payload["errors"][0]["code"] == code
        assert "data" not in payload


@pytest.mark.parametrize(
    ("fields", "status", "code", "parameter"),
    [
        ({"upscaleFactor": 5}, 400, "invalidUpscaleFactor", "upscaleFactor"),
        ({"upscaleFactor": "2"}, 400, "invalidUpscaleFactor", "upscaleFactor"),
        ({"outputQuality": 10}, 400, "invalidOutputQuality", "outputQuality"),
        ({"outputFormat": "GIF"}, 400, "invalidOutputFormat", "outputFormat"),
        ({"outputType": "file"}, 400, "invalidOutputType", "outputType"),
        ({"model": "runware:999@1"}, 400, "invalidModel", "model"),
        ({"inputImage": "6b1d5bd8-0c7b-4bd4-9f93-7f7b07a6d6a1"}, 404, "imageNotFound", "inputImage"),
        ({"inputImage": "bm90IGFuIGltYWdl"}, 400, "invalidImage", "inputImage"),
        ({"taskUUID": "not-a-uuid"}, 400, "invalidTaskUUID", "taskUUID"),
    ],
)
def test_bad_fields_get_the_right_error(
    client: TestClient, fields: dict[str, Any], status: int, code: str, parameter: str
) -> None:
    task = upscale_task(data_uri(encode(photo_crop())), **fields)
    got_status, body = post(client, [task])
    assert got_status == status, body
    error = body["errors"][0]
    assert (error["code"], error["parameter"]) == (code, parameter)
    assert error["taskType"] == "imageUpscale" and error["taskUUID"] == task["taskUUID"]
    assert isinstance(error["message"], str) and error["message"]


def test_unknown_images_and_tasks_are_404(client: TestClient) -> None:
    assert client.get("/image/6b1d5bd8-0c7b-4bd4-9f93-7f7b07a6d6a1.png").status_code == 404
    assert client.get("/image/../../etc/passwd").status_code == 404
    status, body = post(client, [{"taskType": "getResponse", "taskUUID": new_uuid()}])
    assert status == 404 and body["errors"][0]["taskType"] == "getResponse"


def test_restart_keeps_images_and_results(tmp_path: Path) -> None:
    task = upscale_task(data_uri(encode(photo_crop())))
    with api_client(make_settings(tmp_path)) as first:
        item = post(first, [task])[1]["data"][0]
    with api_client(make_settings(tmp_path)) as second:
        status, body = post(second, [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        assert status == 200 and body["data"][0]["imageUUID"] == item["imageUUID"]
        image, _ = fetch_image(second, item["imageURL"])
        assert image.size == (48, 32)


def test_url_outputs_honour_ttl(client: TestClient) -> None:
    before = time.time()
    task = upscale_task(data_uri(encode(photo_crop())), outputType="URL", ttl=60)
    item = post(client, [task])[1]["data"][0]
    stored = client.app.state.context.images.get(item["imageUUID"], touch=False)  # type: ignore[attr-defined]
    assert stored is not None and stored.expires_at is not None
    assert before + 60 <= stored.expires_at <= time.time() + 60
    status, body = post(client, [upscale_task(data_uri(encode(photo_crop())), ttl=30)])
    assert status == 400 and body["errors"][0]["parameter"] == "ttl" and body["errors"][0]["min"] == 60


def test_images_without_a_local_file_are_served_from_the_storage(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage that keeps images elsewhere (no ``local_path``) is read through ``read_bytes``."""
    item = upload(client, photo_crop(20, 10))
    on_disk = client.get(item["imageURL"]).content
    local_get = LocalImageStore.get

    def remote_get(store: LocalImageStore, image_uuid: str, *, touch: bool = True) -> StoredImage | None:
        found = local_get(store, image_uuid, touch=touch)
        return None if found is None else dataclasses.replace(found, local_path=None)

    monkeypatch.setattr(LocalImageStore, "get", remote_get)
    response = client.get(item["imageURL"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == on_disk


@pytest.mark.parametrize(
    ("api_key", "header", "status", "code"),
    [
        (KEY, None, 200, None),
        (5, AUTH, 200, None),  # not a string: the header stands in
        (5, None, 401, "missingApiKey"),
        ("", AUTH, 401, "missingApiKey"),  # a string, even empty, is the key presented
        ("  ", AUTH, 401, "invalidApiKey"),
        ("wrong", AUTH, 401, "invalidApiKey"),
    ],
)
def test_an_in_body_authentication_task_over_rest(
    client: TestClient, api_key: object, header: dict[str, str] | None, status: int, code: str | None
) -> None:
    tasks = [{"taskType": "authentication", "apiKey": api_key}, {"taskType": "ping", "ping": True}]
    got, body = post(client, tasks, headers=header)
    assert got == status, body
    if code is None:
        assert body == {"data": [{"taskType": "ping", "pong": True}]}
    else:
        [error] = body["errors"]
        assert (error["code"], error["taskType"]) == (code, "authentication")
        if code == "missingApiKey":
            assert "Authorization: Bearer" in error["message"]


def test_open_mode_accepts_an_authentication_task_without_a_usable_key(tmp_path: Path) -> None:
    with api_client(resize_settings(tmp_path)) as open_client:
        for leading in ({"taskType": "authentication"}, {"taskType": "authentication", "apiKey": ""}):
            assert post(open_client, [leading, {"taskType": "ping", "ping": True}], headers=None)[0] == 200

"""Stored inputs lose their metadata (GPS position above all), keep their pixels, profile and orientation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageCms, PngImagePlugin

from tests.api_helpers import b64, make_client, new_uuid, upscale_task
from upscale_server.imaging import decode_image, exif_orientation
from upscale_server.metadata import strip_metadata
from upscale_server.vocabulary import ImageFormat

KEY = "metadata-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GPS_IFD = 0x8825
ORIENTATION = 0x0112
MAKER = "PhoneMakerSerial-4242"


def gps_exif(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = MAKER
    exif[GPS_IFD] = {1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 2.0)}
    return exif.tobytes()


def photo_with_gps(fmt: str, orientation: int = 6, **options: Any) -> bytes:
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=gps_exif(orientation), **options)
    return buffer.getvalue()


def gps_of(data: bytes) -> dict[int, Any]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return dict(image.getexif().get_ifd(GPS_IFD))


@pytest.mark.parametrize(
    ("fmt", "wire", "options"),
    [
        ("JPEG", ImageFormat.JPG, {"quality": 90}),
        ("JPEG", ImageFormat.JPG, {"progressive": True}),
        ("PNG", ImageFormat.PNG, {}),
        ("WEBP", ImageFormat.WEBP, {"lossless": True}),
    ],
)
def test_gps_goes_and_pixels_and_orientation_stay(fmt: str, wire: ImageFormat, options: dict[str, Any]) -> None:
    data = photo_with_gps(fmt, **options)
    assert gps_of(data) and exif_orientation(data) == 6
    stripped = strip_metadata(data, wire, orientation=exif_orientation(data))
    assert stripped is not None
    assert gps_of(stripped) == {} and MAKER.encode() not in stripped
    assert exif_orientation(stripped) == 6
    assert np.array_equal(decode_image(stripped).pixels, decode_image(data).pixels)


def test_jpeg_keeps_its_icc_profile_and_its_scans_byte_for_byte() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = Image.new("RGB", (16, 16), (200, 10, 10))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=gps_exif(1), icc_profile=icc, comment=b"shot at home")
    data = buffer.getvalue()
    stripped = strip_metadata(data, ImageFormat.JPG, orientation=1)
    assert stripped is not None and b"Exif" not in stripped and b"shot at home" not in stripped
    with Image.open(io.BytesIO(stripped)) as opened:
        assert opened.info["icc_profile"] == icc
    scans = data.index(b"\xff\xda")
    assert stripped.endswith(data[scans:])


def test_an_mpo_keeps_only_its_first_picture() -> None:
    """A phone's multi-picture JPEG: each picture has its own EXIF; decoding reads the first one only."""
    exif = Image.Exif()
    exif[0x010F] = MAKER
    exif[GPS_IFD] = {1: "N", 2: (52.0, 22.0, 1.5)}
    buffer = io.BytesIO()
    first, second = Image.new("RGB", (32, 24), (200, 0, 0)), Image.new("RGB", (32, 24), (0, 200, 0))
    first.save(buffer, "MPO", save_all=True, append_images=[second], exif=exif.tobytes())
    data = buffer.getvalue()
    assert data.count(MAKER.encode()) == 2
    stripped = strip_metadata(data, ImageFormat.JPG)
    assert stripped is not None and MAKER.encode() not in stripped
    assert np.array_equal(decode_image(stripped).pixels, decode_image(data).pixels)


def test_png_text_chunks_go_too() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Location", "52.37N 4.89E")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG", pnginfo=info)
    stripped = strip_metadata(buffer.getvalue(), ImageFormat.PNG)
    assert stripped is not None and b"Location" not in stripped and b"tEXt" not in stripped


def test_a_container_it_cannot_walk_is_left_to_re_encoding() -> None:
    assert strip_metadata(b"\xff\xd8\xff\xe1\xff\xff", ImageFormat.JPG) is None
    assert strip_metadata(b"\x89PNG\r\n\x1a\n\x00\x00", ImageFormat.PNG) is None
    assert strip_metadata(b"RIFF\x00\x00\x00\x00WEBPVP8 \xff\xff\xff\x00", ImageFormat.WEBP) is None


def stored_bytes(client: TestClient, image_uuid: str) -> bytes:
    storage = client.app.state.context.images  # type: ignore[attr-defined]
    stored = storage.get(image_uuid)
    assert stored is not None
    data: bytes = storage.read_bytes(stored)
    return data


@pytest.mark.parametrize("keep", [False, True])
def test_stored_inputs_lose_their_gps_unless_kept(tmp_path: Path, keep: bool) -> None:
    photo = photo_with_gps("JPEG", quality=90)
    with make_client(tmp_path, KEY, keep_metadata=keep) as client:
        upscale = upscale_task(b64(photo))
        upload = {"taskType": "imageUpload", "taskUUID": new_uuid(), "image": b64(photo)}
        response = client.post("/v1", json=[upscale, upload], headers=AUTH)
        assert response.status_code == 200, response.text
        items = {item["taskUUID"]: item for item in response.json()["data"]}
        stored_input = stored_bytes(client, items[upscale["taskUUID"]]["inputImageUUID"])
        assert bool(gps_of(stored_input)) is keep
        assert exif_orientation(stored_input) == 6
        if not keep:
            assert np.array_equal(decode_image(stored_input).pixels, decode_image(photo).pixels)
        # imageUpload re-encodes what it stores (orientation applied): never any metadata
        assert gps_of(stored_bytes(client, items[upload["taskUUID"]]["imageUUID"])) == {}

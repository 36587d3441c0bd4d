"""Small builders shared by the API tests: images as the wire carries them, and task dicts."""

from __future__ import annotations

import base64
import io
import uuid
from typing import Any

from PIL import Image

from tests.conftest import PHOTO


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

"""Turning image inputs into pictures and pictures into stored outputs (all blocking: run in threads).

Shared by ``imageUpload`` and the upscale tasks, so both accept the same input forms and store
images the same way. The dispatcher runs the decoders and encoders here in its codec pool, never on
the event loop or the inference worker.
"""

from __future__ import annotations

import base64
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

from upscale_server.errors import ImageNotFoundError, ImageTooLargeError, InvalidImageError
from upscale_server.imaging import Picture, decode_image, encode_image, resize_pixels
from upscale_server.storage.images import ImageStore, StoredImage

#: Output format names on the wire -> (Pillow encoder name, file extension, media type).
OUTPUT_FORMATS = {
    "JPG": ("JPEG", "jpg", "image/jpeg"),
    "PNG": ("PNG", "png", "image/png"),
    "WEBP": ("WEBP", "webp", "image/webp"),
}
#: Stored uploads keep a lossless format unless the source was lossy.
UPLOAD_FORMAT_FOR_SOURCE = {"JPEG": "JPG", "WEBP": "WEBP"}


@dataclass(frozen=True)
class StoredOutput:
    image: StoredImage
    data: bytes


def load_stored(images: ImageStore, image_uuid: str, *, parameter: str) -> tuple[bytes, StoredImage]:
    """Bytes of a stored upload or output (refreshing its last use); ImageNotFoundError if gone."""
    stored = images.get(image_uuid)
    if stored is None:
        raise ImageNotFoundError(
            f"no stored image with UUID {image_uuid} (never uploaded, or expired)", parameter=parameter
        )
    return images.read_bytes(stored), stored


def decode_input(data: bytes, *, max_pixels: int, parameter: str) -> Picture:
    """Decode an input image, naming the request field at fault when it is not one we can read."""
    try:
        return decode_image(data, max_pixels=max_pixels)
    except (InvalidImageError, ImageTooLargeError) as exc:
        exc.parameter = exc.parameter or parameter
        raise


def store_upload(
    images: ImageStore, picture: Picture, *, max_side: int, executor: Executor | None = None
) -> StoredImage:
    """Store an uploaded image as Runware does: at most ``max_side`` on the long side (EXIF already applied).

    ``executor``: idle threads that may share a big PNG encode (see :func:`~upscale_server.imaging.encode_image`)."""
    longest = max(picture.width, picture.height)
    if longest > max_side:
        ratio = max_side / longest
        size = (max(1, round(picture.width * ratio)), max(1, round(picture.height * ratio)))
        picture = replace(picture, pixels=resize_pixels(picture.pixels, *size))
    wire_format = UPLOAD_FORMAT_FOR_SOURCE.get(picture.source_format, "PNG")
    encoder, extension, _ = OUTPUT_FORMATS[wire_format]
    encoded = encode_image(picture, encoder, quality=95, executor=executor)  # type: ignore[arg-type]
    return images.put(encoded, extension=extension, kind="upload")  # type: ignore[arg-type]


def store_output(
    images: ImageStore,
    picture: Picture,
    *,
    output_format: str,
    quality: int,
    ttl_seconds: float | None,
    executor: Executor | None = None,
) -> StoredOutput:
    """Encode once and store; the bytes are kept for the reply (base64, upload) so nothing is re-encoded.

    ``executor``: idle threads that may share a big PNG encode (see :func:`~upscale_server.imaging.encode_image`)."""
    encoder, extension, _ = OUTPUT_FORMATS[output_format]
    data = encode_image(picture, encoder, quality=quality, executor=executor)  # type: ignore[arg-type]
    stored = images.put(data, extension=extension, kind="output", ttl_seconds=ttl_seconds)  # type: ignore[arg-type]
    return StoredOutput(stored, data)


def output_fields(output: StoredOutput, output_type: str, image_url: str) -> dict[str, str]:
    """The one result field ``outputType`` asks for."""
    if output_type == "URL":
        return {"imageURL": image_url}
    encoded = base64.b64encode(output.data).decode("ascii")
    if output_type == "base64Data":
        return {"imageBase64Data": encoded}
    return {"imageDataURI": f"data:{output.image.content_type};base64,{encoded}"}


SOURCE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def store_input(images: ImageStore, data: bytes, picture: Picture) -> StoredImage:
    """Keep an inline upscale input so its ``inputImageUUID`` can be reused; raw bytes when possible."""
    extension = SOURCE_EXTENSIONS.get(picture.source_format)
    if extension is None:  # BMP, GIF...: stored as PNG, the format every client can read back
        data, extension = encode_image(picture, "PNG"), "png"
    return images.put(data, extension=extension, kind="upload")  # type: ignore[arg-type]


#: Result fields that inline the image: kept out of the task database, rebuilt from the stored image.
INLINE_OUTPUT_FIELDS = ("imageBase64Data", "imageDataURI")
_INLINE_MARK = "_inlineOutput"


def compact_result(item: dict[str, Any], base_url: str) -> dict[str, Any]:
    """The result item as the task database keeps it: megabytes of base64 replaced by a marker, and
    the server's own URLs kept as paths, so a poll after a restart on another address gets working URLs."""
    stored = dict(item)
    for field in INLINE_OUTPUT_FIELDS:
        if field in stored:
            del stored[field]
            stored[_INLINE_MARK] = field
    url = stored.get("imageURL")
    if isinstance(url, str) and url.startswith(base_url.rstrip("/") + "/"):
        stored["imageURL"] = url[len(base_url.rstrip("/")) :]
    return stored


def expand_result(images: ImageStore, stored: dict[str, Any], base_url: str) -> dict[str, Any]:
    """Inverse of :func:`compact_result`, reading inline outputs back from the image store."""
    item = {k: v for k, v in stored.items() if k != _INLINE_MARK}
    url = item.get("imageURL")
    if isinstance(url, str) and url.startswith("/"):
        item["imageURL"] = base_url.rstrip("/") + url
    field = stored.get(_INLINE_MARK)
    if field is None:
        return item
    data, image = load_stored(images, str(item["imageUUID"]), parameter="taskUUID")
    encoded = base64.b64encode(data).decode("ascii")
    item[field] = encoded if field == "imageBase64Data" else f"data:{image.content_type};base64,{encoded}"
    return item

"""The shape of a stored result and of an image URL, each written once.

A result item is kept in the task records as the client will get it back from ``getResponse``, with
two differences: megabytes of base64 are replaced by a marker (the image store has the bytes), and the
server's own image URLs are kept as paths, so a poll after a restart, or through another address,
gets working URLs.
"""

from __future__ import annotations

import base64
from typing import Any

from upscale_server.protocol import OUTPUT_FIELDS, WireItem
from upscale_server.storage import ImageStorage, StoredImage
from upscale_server.tasks.images import load_stored

#: The route stored images are served on (``GET /image/<uuid>.<ext>``).
IMAGE_ROUTE = "/image/{name}"

#: Result fields that inline the image: kept out of the task records, rebuilt from the stored image.
INLINE_OUTPUT_FIELDS = (OUTPUT_FIELDS["base64Data"], OUTPUT_FIELDS["dataURI"])
_INLINE_MARK = "_inlineOutput"


def image_path(image: StoredImage) -> str:
    return IMAGE_ROUTE.format(name=f"{image.uuid}.{image.extension}")


def image_url(base_url: str, image: StoredImage) -> str:
    """Where clients fetch ``image``: its path on the server's base URL."""
    return base_url.rstrip("/") + image_path(image)


def base64_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_uri(image: StoredImage, data: bytes) -> str:
    return f"data:{image.content_type};base64,{base64_text(data)}"


def stored_result(item: WireItem, base_url: str) -> dict[str, Any]:
    """``item`` as the task records keep it (see the module docstring)."""
    stored = dict(item)
    for field in INLINE_OUTPUT_FIELDS:
        if field in stored:
            del stored[field]
            stored[_INLINE_MARK] = field
    url = stored.get("imageURL")
    prefix = base_url.rstrip("/")
    if isinstance(url, str) and url.startswith(prefix + "/"):
        stored["imageURL"] = url[len(prefix) :]
    return stored


def replayed_result(images: ImageStorage, stored: dict[str, Any], base_url: str) -> WireItem:
    """Inverse of :func:`stored_result`, reading inline outputs back from the image store (blocking)."""
    item: WireItem = {k: v for k, v in stored.items() if k != _INLINE_MARK}
    url = item.get("imageURL")
    if isinstance(url, str) and url.startswith("/"):
        item["imageURL"] = base_url.rstrip("/") + url
    field = stored.get(_INLINE_MARK)
    if field is None:
        return item
    data, image = load_stored(images, str(item["imageUUID"]), parameter="taskUUID")
    item[field] = base64_text(data) if field == OUTPUT_FIELDS["base64Data"] else data_uri(image, data)
    return item

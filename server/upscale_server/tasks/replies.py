"""The size of one request's reply, bounded: inline images counted before they are built or sent.

A result's inline image (``base64Data``, ``dataURI``) is the only part of a reply item that can be big,
and ``getResponse`` rebuilds it from the store for every poll: 24 polls of one finished task in a
1.9 KB request made a 1.5 GB reply. So each request gets a :class:`ReplyBudget` of
``UPSCALE_MAX_REPLY_BYTES``; a poll takes its share from the stored image's size before reading it, a
sync upscale when its result comes back, and a task whose share does not fit is answered with
``payloadTooLarge`` instead (its result stays recorded). Repeated polls of one task in a request are
answered once (:func:`without_repeated_polls`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from upscale_server.errors import PayloadTooLargeError
from upscale_server.protocol import OUTPUT_FIELDS, task_identity

#: Result fields that inline the image.
INLINE_FIELDS = (OUTPUT_FIELDS["base64Data"], OUTPUT_FIELDS["dataURI"])
#: Room for ``data:<media type>;base64,`` in front of a data URI.
_DATA_URI_PREFIX = 64


class ReplyBudget:
    """Inline image bytes the reply to one request may still carry; shared by its tasks (and by the
    threads that read stored images for them)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._left = limit
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        """Count ``size`` more bytes, or raise PayloadTooLargeError (nothing counted) when they do not fit."""
        if self.limit is None or size == 0:
            return
        with self._lock:
            assert self._left is not None
            if size > self._left:
                raise PayloadTooLargeError(
                    f"The reply to this request would carry more than {self.limit} bytes of inline images "
                    "(UPSCALE_MAX_REPLY_BYTES). The result is kept: poll this task alone with getResponse, or ask "
                    "for outputType URL.",
                    parameter="outputType",
                    max=self.limit,
                )
            self._left -= size

    def take_item(self, item: Mapping[str, object]) -> None:
        """Count the inline images of a built result item."""
        self.take(sum(len(value) for field in INLINE_FIELDS if isinstance(value := item.get(field), str)))


def inline_size(image_bytes: int, field: str) -> int:
    """The characters an image of ``image_bytes`` takes inline as ``field`` (base64, or a data URI)."""
    encoded = 4 * ((image_bytes + 2) // 3)
    return encoded + (_DATA_URI_PREFIX if field == OUTPUT_FIELDS["dataURI"] else 0)


def without_repeated_polls(raw_tasks: Sequence[object]) -> list[object]:
    """``raw_tasks`` with every ``getResponse`` after the first for one taskUUID left out: the answer would
    be the same, and building it again costs as much."""
    polled: set[str] = set()
    kept: list[object] = []
    for raw in raw_tasks:
        task_type, task_uuid = task_identity(raw)
        if task_type == "getResponse" and task_uuid is not None:
            if task_uuid in polled:
                continue
            polled.add(task_uuid)
        kept.append(raw)
    return kept

"""The shape of a stored result and of an image URL, each written once.

A result item is kept in the task records as the client will get it back from ``getResponse``, with
two differences: megabytes of base64 are replaced by a marker (the image store has the bytes), and the
server's own image URLs are kept as paths, so a poll after a restart, or through another address,
gets working URLs.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from typing import Any

from upscale_server.errors import TaskNotFoundError
from upscale_server.protocol import OUTPUT_FIELDS, Outcome, WireItem, processing_item, with_status
from upscale_server.storage import ImageStorage, StoredImage, TaskRecords
from upscale_server.tasks.images import load_stored
from upscale_server.tasks.replies import INLINE_FIELDS, ReplyBudget, inline_size

#: The route stored images are served on (``GET /image/<uuid>.<ext>``).
IMAGE_ROUTE = "/image/{name}"

#: Result fields that inline the image: kept out of the task records, rebuilt from the stored image.
INLINE_OUTPUT_FIELDS = INLINE_FIELDS
_INLINE_MARK = "_inlineOutput"
#: Kept with a recorded error: the HTTP status a sync reply read back from the records answers with.
_STATUS_MARK = "_httpStatus"


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


def replayed_result(
    images: ImageStorage, stored: dict[str, Any], base_url: str, budget: ReplyBudget | None = None
) -> WireItem:
    """Inverse of :func:`stored_result`, reading inline outputs back from the image store (blocking); an
    inline output is counted against ``budget`` before it is read."""
    item: WireItem = {k: v for k, v in stored.items() if k != _INLINE_MARK}
    url = item.get("imageURL")
    if isinstance(url, str) and url.startswith("/"):
        item["imageURL"] = base_url.rstrip("/") + url
    field = stored.get(_INLINE_MARK)
    if field is None:
        return item
    if budget is not None and (known := images.get(str(item["imageUUID"]))) is not None:
        budget.take(inline_size(known.size_bytes, field))
    data, image = load_stored(images, str(item["imageUUID"]), parameter="taskUUID")
    item[field] = base64_text(data) if field == OUTPUT_FIELDS["base64Data"] else data_uri(image, data)
    return item


def stored_error(outcome: Outcome) -> dict[str, Any]:
    """A failed outcome's error item as the task records keep it: with its status, and the HTTP status
    of a sync reply (a task finished by another process is answered from its record)."""
    assert outcome.error is not None
    return {**with_status(outcome.error, "error"), _STATUS_MARK: outcome.status}


class RecordedResults:
    """Outcomes read back from the task records: for ``getResponse``, and for a sync request whose task
    another process finished (a cluster worker)."""

    def __init__(self, records: TaskRecords, images: ImageStorage) -> None:
        self.records = records
        self.images = images

    async def poll(self, task_uuid: str, base_url: str, *, owner: str, budget: ReplyBudget | None = None) -> Outcome:
        """What ``getResponse`` answers: ``processing``, the result, or the error item with HTTP 200 (the
        poll itself succeeded). TaskNotFoundError when the task is unknown, its result expired, or it
        belongs to another tenant (the same error: another key's task does not exist for this one);
        PayloadTooLargeError when its inline image does not fit in ``budget``."""
        outcome, _ = await self._read(task_uuid, base_url, budget, owner=owner)
        return outcome

    async def finished(self, task_uuid: str, base_url: str) -> Outcome:
        """A finished task's outcome exactly as its sync request would have had it from the process that
        ran it: without the poll's ``status`` field, an error with its own HTTP status."""
        outcome, status = await self._read(task_uuid, base_url)
        if outcome.error is not None:
            return Outcome(error=_without_poll_status(outcome.error), status=status)
        return Outcome(item=None if outcome.item is None else _without_poll_status(outcome.item))

    async def frame(self, task_uuid: str, base_url: str) -> dict[str, Any] | None:
        """A finished task as the frame its WebSocket session gets; None when its record is gone."""
        try:
            return (await self.finished(task_uuid, base_url)).envelope()
        except TaskNotFoundError:
            return None

    async def _read(
        self, task_uuid: str, base_url: str, budget: ReplyBudget | None = None, *, owner: str | None = None
    ) -> tuple[Outcome, int]:
        """The task's outcome; ``owner`` (a poll's tenant) must match the record's, None skips the check
        (the server reading back a task it accepted itself)."""
        record = await asyncio.to_thread(self.records.get, task_uuid)
        if record is None or (owner is not None and not hmac.compare_digest(record.owner, owner)):
            raise TaskNotFoundError(
                f"no task with taskUUID {task_uuid} (never sent, or its result expired)", parameter="taskUUID"
            )
        if record.status == "processing":
            return Outcome(item=processing_item(record.task_type, record.task_uuid)), 200
        if record.status == "success":
            assert record.item is not None
            item = await asyncio.to_thread(replayed_result, self.images, record.item, base_url, budget)
            return Outcome(item=item), 200
        assert record.error is not None
        error = {key: value for key, value in record.error.items() if key != _STATUS_MARK}
        status = record.error.get(_STATUS_MARK)
        return Outcome(error=error, status=200), status if isinstance(status, int) else 500


def _without_poll_status(item: WireItem) -> WireItem:
    return {key: value for key, value in item.items() if key != "status"}

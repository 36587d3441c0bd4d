"""``imageUpload``: store an image (at most 2048 px on its long side) under a new UUID for later tasks."""

from __future__ import annotations

import asyncio

from upscale_server.budget import Reservation, pixel_cost
from upscale_server.errors import ConflictTaskUUIDError, ImageTooLargeError, InvalidImageError
from upscale_server.protocol import ImageUploadTask, Outcome, WireItem, dry_run_item, upload_item
from upscale_server.tasks.dispatcher import Emit, RequestContext
from upscale_server.tasks.images import TaskImages
from upscale_server.tasks.lifecycle import TaskLifecycle
from upscale_server.tasks.results import image_url


class UploadHandler:
    """Always synchronous, and not admitted against the upscale capacity: it is quick, and the
    client needs its UUID to send the upscale at all. It is admitted against the memory budget: the
    image is fetched and its header read first, so an upload that does not fit is refused (429) before
    its UUID is claimed, and its pixels are reserved until they are stored."""

    def __init__(self, lifecycle: TaskLifecycle, images: TaskImages) -> None:
        self.lifecycle = lifecycle
        self.images = images

    async def __call__(self, task: ImageUploadTask, request: RequestContext, emit: Emit) -> None:
        data, _ = await self.images.input_bytes(task.image, "image")
        reservation = await self._admit(data)
        try:
            if request.dry_run:
                await emit(Outcome(item=await self._rehearse(task, data)))
                return
            await self.lifecycle.accept(task.task_type, task.task_uuid, "sync", request.owner)
            outcome: Outcome = await self.lifecycle.execute(
                task.task_type,
                task.task_uuid,
                request.base_url,
                self._upload(task, data, request.base_url),
                webhook_url=None,
            )
        finally:
            if reservation is not None:
                reservation.release()
        await emit(outcome)

    async def _admit(self, data: bytes) -> Reservation | None:
        """The image's pixels reserved in the memory budget (QueueFullError when they do not fit now).
        None when the header is unreadable: decoding refuses the same bytes before any pixel exists."""
        try:
            header = await self.images.header(data, "image")
        except (InvalidImageError, ImageTooLargeError):
            return None
        what = f"the {header.width}x{header.height} image to upload"
        return self.images.budget.reserve(pixel_cost(header, encoded_bytes=len(data)), what=what, parameter="image")

    async def _rehearse(self, task: ImageUploadTask, data: bytes) -> WireItem:
        """A dry run: the UUID is free and the image can be read, as a real upload would check; nothing
        is claimed or stored."""
        if await asyncio.to_thread(self.lifecycle.records.get, task.task_uuid) is not None:
            raise ConflictTaskUUIDError.for_task(task.task_uuid)
        await self.images.decode(data, "image")
        return dry_run_item(task.task_type, task.task_uuid)

    async def _upload(self, task: ImageUploadTask, data: bytes, base_url: str) -> WireItem:
        picture = await self.images.decode(data, "image")
        stored = await self.images.store_upload(picture)
        return upload_item(task.task_uuid, stored.uuid, image_url(base_url, stored))

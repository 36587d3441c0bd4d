"""``imageUpload``: store an image (at most 2048 px on its long side) under a new UUID for later tasks."""

from __future__ import annotations

import asyncio

from upscale_server.errors import ConflictTaskUUIDError
from upscale_server.protocol import ImageUploadTask, Outcome, WireItem, dry_run_item, upload_item
from upscale_server.tasks.dispatcher import Emit, RequestContext
from upscale_server.tasks.images import TaskImages
from upscale_server.tasks.lifecycle import TaskLifecycle
from upscale_server.tasks.results import image_url


class UploadHandler:
    """Always synchronous, and not admitted against the upscale capacity: it is quick, and the
    client needs its UUID to send the upscale at all."""

    def __init__(self, lifecycle: TaskLifecycle, images: TaskImages) -> None:
        self.lifecycle = lifecycle
        self.images = images

    async def __call__(self, task: ImageUploadTask, request: RequestContext, emit: Emit) -> None:
        if request.dry_run:
            await emit(Outcome(item=await self._rehearse(task)))
            return
        await self.lifecycle.accept(task.task_type, task.task_uuid, "sync", request.owner)
        outcome: Outcome = await self.lifecycle.execute(
            task.task_type, task.task_uuid, request.base_url, self._upload(task, request.base_url), webhook_url=None
        )
        await emit(outcome)

    async def _rehearse(self, task: ImageUploadTask) -> WireItem:
        """A dry run: the UUID is free and the image can be read, as a real upload would check; nothing
        is claimed or stored."""
        if await asyncio.to_thread(self.lifecycle.records.get, task.task_uuid) is not None:
            raise ConflictTaskUUIDError.for_task(task.task_uuid)
        data, _ = await self.images.input_bytes(task.image, "image")
        await self.images.decode(data, "image")
        return dry_run_item(task.task_type, task.task_uuid)

    async def _upload(self, task: ImageUploadTask, base_url: str) -> WireItem:
        data, _ = await self.images.input_bytes(task.image, "image")
        picture = await self.images.decode(data, "image")
        stored = await self.images.store_upload(picture)
        return upload_item(task.task_uuid, stored.uuid, image_url(base_url, stored))

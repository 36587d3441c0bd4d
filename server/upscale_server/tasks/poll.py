"""``getResponse``: what became of an earlier task, read back from the task records."""

from __future__ import annotations

import asyncio

from upscale_server.errors import TaskNotFoundError
from upscale_server.protocol import GetResponseTask, Outcome, processing_item
from upscale_server.storage import ImageStorage, TaskRecords
from upscale_server.tasks.dispatcher import Emit, RequestContext
from upscale_server.tasks.results import replayed_result


class GetResponseHandler:
    """Answers ``processing``, the recorded result (inline images read back from storage), or the
    recorded error item (HTTP 200: the poll itself succeeded)."""

    def __init__(self, records: TaskRecords, images: ImageStorage) -> None:
        self.records = records
        self.images = images

    async def __call__(self, task: GetResponseTask, request: RequestContext, emit: Emit) -> None:
        record = await asyncio.to_thread(self.records.get, task.task_uuid)
        if record is None:
            raise TaskNotFoundError(
                f"no task with taskUUID {task.task_uuid} (never sent, or its result expired)",
                parameter="taskUUID",
            )
        if record.status == "processing":
            await emit(Outcome(item=processing_item(record.task_type, record.task_uuid)))
        elif record.status == "success":
            assert record.item is not None
            item = await asyncio.to_thread(replayed_result, self.images, record.item, request.base_url)
            await emit(Outcome(item=item))
        else:
            assert record.error is not None
            await emit(Outcome(error=record.error, status=200))

"""``getResponse``: what became of an earlier task, read back from the task records."""

from __future__ import annotations

from upscale_server.protocol import GetResponseTask
from upscale_server.tasks.dispatcher import Emit, RequestContext
from upscale_server.tasks.results import RecordedResults


class GetResponseHandler:
    """Answers ``processing``, the recorded result (inline images read back from storage), or the
    recorded error item (HTTP 200: the poll itself succeeded); only to the tenant that sent the task."""

    def __init__(self, results: RecordedResults) -> None:
        self.results = results

    async def __call__(self, task: GetResponseTask, request: RequestContext, emit: Emit) -> None:
        await emit(
            await self.results.poll(task.task_uuid, request.base_url, owner=request.owner, budget=request.reply_budget)
        )

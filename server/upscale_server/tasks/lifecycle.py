"""The life of every recorded task, written once: admission, claim, run, record, notify.

``imageUpload`` and the upscale tasks both go through it; ``getResponse`` and ``ping`` record nothing.
:meth:`TaskLifecycle.accept` admits (a place in the job queue) and claims a task before anything is
acknowledged: a refusal is a plain error reply, and a refused task leaves no trace, so the client may
send it again. :meth:`TaskLifecycle.execute` runs the work, records its result or its error (the
first outcome recorded stays), so ``getResponse`` can answer later, and sends the webhook.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from upscale_server.delivery import WebhookSender
from upscale_server.errors import ConflictTaskUUIDError
from upscale_server.observability.metrics import Metrics
from upscale_server.protocol import Outcome, WireItem, with_status
from upscale_server.queue import JobQueue
from upscale_server.storage import TaskRecords
from upscale_server.tasks.results import stored_result

log = logging.getLogger(__name__)


class TaskLifecycle:
    """Admission (through the job queue) and the record of every task (in the task records)."""

    def __init__(self, records: TaskRecords, jobs: JobQueue, webhooks: WebhookSender, metrics: Metrics) -> None:
        self.records = records
        self.jobs = jobs
        self.webhooks = webhooks
        self.metrics = metrics

    async def accept(self, task_type: str, task_uuid: str, delivery: str, *, admitted: bool) -> None:
        """Claim ``task_uuid`` as processing. An ``admitted`` task (an upscale, which the caller then
        submits to the job queue) first takes a place there: QueueFullError (429) when none is free.
        ConflictTaskUUIDError when the UUID is taken, and the place is given back."""
        if admitted:
            self.jobs.admit()
        try:
            claimed = await asyncio.to_thread(self.records.claim, task_uuid, task_type, delivery)
        except BaseException:
            if admitted:
                self.jobs.release()
            raise
        if not claimed:
            if admitted:
                self.jobs.release()
            raise ConflictTaskUUIDError(
                f"taskUUID {task_uuid} was already used; send each task with a new UUID "
                "(getResponse returns the earlier task's result)",
                parameter="taskUUID",
            )

    async def execute(
        self, task_type: str, task_uuid: str, base_url: str, work: Awaitable[WireItem], *, webhook_url: str | None
    ) -> Outcome:
        """Run a claimed task's ``work``, record what came of it, notify ``webhook_url``; never raises."""
        outcome = await self._run_and_record(task_type, task_uuid, base_url, work)
        if webhook_url:
            self.webhooks.send(webhook_url, outcome.envelope(), task_uuid=task_uuid)
        return outcome

    async def _run_and_record(
        self, task_type: str, task_uuid: str, base_url: str, work: Awaitable[WireItem]
    ) -> Outcome:
        try:
            item = await work
        except Exception as exc:
            return await self._fail(Outcome.failed(exc, task_type, task_uuid), task_type, task_uuid)
        self.metrics.task_finished(task_type, "success")
        try:
            recorded = stored_result(with_status(item, "success"), base_url)
            await asyncio.to_thread(self.records.complete, task_uuid, recorded)
        except Exception as exc:  # the result exists but could not be recorded: say so to pollers
            await self._record_failure(Outcome.failed(exc, task_type, task_uuid), task_uuid)
        return Outcome(item=item)

    async def _fail(self, outcome: Outcome, task_type: str, task_uuid: str) -> Outcome:
        assert outcome.error is not None
        self.metrics.task_finished(task_type, str(outcome.error["code"]))
        await self._record_failure(outcome, task_uuid)
        return outcome

    async def _record_failure(self, outcome: Outcome, task_uuid: str) -> None:
        assert outcome.error is not None
        try:
            await asyncio.to_thread(self.records.fail, task_uuid, with_status(outcome.error, "error"))
        except Exception:
            log.exception("task %s: its error could not be recorded", task_uuid)

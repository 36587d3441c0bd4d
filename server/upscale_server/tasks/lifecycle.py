"""The life of every recorded task, written once: admission, claim, run, record, notify.

``imageUpload`` and the upscale tasks both go through it; ``getResponse`` and ``ping`` record nothing.
A task is claimed before anything is acknowledged (:meth:`TaskLifecycle.accept` for an upload, the job
queue's ``enqueue`` for an upscale, which admits it in the same step): a refusal is a plain error reply,
and a refused task leaves no trace, so the client may send it again. :meth:`TaskLifecycle.execute` runs
the work, records its result or its error (the first outcome recorded stays), so ``getResponse`` can
answer later, and sends the webhook.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from upscale_server.delivery import WebhookSender
from upscale_server.errors import ConflictTaskUUIDError
from upscale_server.observability.metrics import Metrics
from upscale_server.protocol import Outcome, WireItem, with_status
from upscale_server.storage import TaskRecords
from upscale_server.tasks.results import stored_error, stored_result

log = logging.getLogger(__name__)


class TaskLifecycle:
    """The record of every task (in the task records) and its webhook."""

    def __init__(self, records: TaskRecords, webhooks: WebhookSender, metrics: Metrics) -> None:
        self.records = records
        self.webhooks = webhooks
        self.metrics = metrics

    async def accept(self, task_type: str, task_uuid: str, delivery: str, owner: str = "") -> None:
        """Claim ``task_uuid`` for ``owner`` as processing for a task this process runs at once (an upload;
        upscales are claimed by the job queue as they are admitted). ConflictTaskUUIDError when the UUID is
        taken."""
        claimed = await asyncio.to_thread(self.records.claim, task_uuid, task_type, delivery, owner)
        if not claimed:
            raise ConflictTaskUUIDError.for_task(task_uuid)

    async def execute(
        self, task_type: str, task_uuid: str, base_url: str, work: Awaitable[WireItem], *, webhook_url: str | None
    ) -> Outcome:
        """Run a claimed task's ``work``, record what came of it, notify ``webhook_url``; never raises.

        Only the run that records the outcome notifies: when the task was finished already (in a cluster,
        by another worker that re-ran it), this outcome is dropped and no second webhook goes out."""
        outcome, recorded = await self._run_and_record(task_type, task_uuid, base_url, work)
        if webhook_url and recorded:
            self.webhooks.send(webhook_url, outcome.envelope(), task_uuid=task_uuid)
        return outcome

    async def _run_and_record(
        self, task_type: str, task_uuid: str, base_url: str, work: Awaitable[WireItem]
    ) -> tuple[Outcome, bool]:
        try:
            item = await work
        except Exception as exc:
            return await self._fail(Outcome.failed(exc, task_type, task_uuid), task_type, task_uuid)
        self.metrics.task_finished(task_type, "success")
        try:
            stored = stored_result(with_status(item, "success"), base_url)
            recorded = await asyncio.to_thread(self.records.complete, task_uuid, stored)
        except Exception as exc:  # the result exists but could not be recorded: say so to pollers
            return Outcome(item=item), await self._record_failure(Outcome.failed(exc, task_type, task_uuid), task_uuid)
        return Outcome(item=item), recorded

    async def _fail(self, outcome: Outcome, task_type: str, task_uuid: str) -> tuple[Outcome, bool]:
        """Count and record a failed task's outcome; returns it and whether this call recorded it."""
        assert outcome.error is not None
        self.metrics.task_finished(task_type, str(outcome.error["code"]))
        return outcome, await self._record_failure(outcome, task_uuid)

    async def _record_failure(self, outcome: Outcome, task_uuid: str) -> bool:
        try:
            return await asyncio.to_thread(self.records.fail, task_uuid, stored_error(outcome))
        except Exception:
            log.exception("task %s: its error could not be recorded", task_uuid)
            return False

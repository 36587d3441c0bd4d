"""The task dispatcher: parses each task of a request and routes it to the handler of its type.

REST and WebSocket differ only in how outcomes travel (one HTTP reply vs. one frame each), so they
hand the task array and an ``emit`` callback here. Every task of an array runs concurrently and fails
on its own: a task that does not parse, or whose handler raises, emits its error item and nothing
else is affected. Authentication is not a task here: the transports decide it before dispatching.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from upscale_server.observability.logs import task_context
from upscale_server.observability.metrics import Metrics
from upscale_server.protocol import AuthenticationTask, Outcome, Task, parse_task, task_identity
from upscale_server.tasks.replies import ReplyBudget, without_repeated_polls

Emit = Callable[[Outcome], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a handler knows about the request a task came in: where its client reaches the server, the
    WebSocket session it came in (None for REST), whether it is a dry run (validate and answer, run and
    record nothing), the tenant that sent it (its API key's owner; '' in open mode), and what its reply
    may still carry of inline images."""

    base_url: str
    session: str | None = None
    dry_run: bool = False
    owner: str = ""
    reply_budget: ReplyBudget = field(default_factory=lambda: ReplyBudget(None), compare=False)


class TaskHandler(Protocol):
    """Runs one parsed task and emits exactly one outcome (or raises, and the dispatcher emits the error)."""

    async def __call__(self, task: Any, request: RequestContext, emit: Emit) -> None: ...


class TaskDispatcher:
    """Routes parsed tasks by type. ``handlers`` maps each task class to the handler that runs it."""

    def __init__(
        self, handlers: Mapping[type[Task], TaskHandler], metrics: Metrics, *, max_reply_bytes: int | None = None
    ) -> None:
        self.handlers = dict(handlers)
        self.metrics = metrics
        self.max_reply_bytes = max_reply_bytes

    async def dispatch(
        self,
        raw_tasks: Sequence[object],
        *,
        base_url: str,
        emit: Emit,
        session: str | None = None,
        dry_run: bool = False,
        owner: str = "",
    ) -> None:
        """Run every task of an array concurrently; each emits exactly one outcome (or has it delivered to
        its ``session`` by the job queue); repeated polls of one task are answered once, and the inline
        images of the whole reply are bounded by ``max_reply_bytes``."""
        request = RequestContext(base_url, session, dry_run, owner, ReplyBudget(self.max_reply_bytes))
        tasks = without_repeated_polls(raw_tasks)
        await asyncio.gather(*(self._run_one(raw, request, emit) for raw in tasks))

    async def _run_one(self, raw: object, request: RequestContext, emit: Emit) -> None:
        task_type, task_uuid = task_identity(raw)
        with task_context(task_uuid):  # every log line of this task, and of what it spawns, carries its UUID
            try:
                task = parse_task(raw)
                if isinstance(task, AuthenticationTask):
                    return  # only a leading one counts, and the transport has taken it already
                await self.handlers[type(task)](task, request, emit)
            except Exception as exc:
                outcome = Outcome.failed(exc, task_type, task_uuid)
                assert outcome.error is not None
                self.metrics.task_finished(task_type or "unknown", str(outcome.error["code"]))
                await emit(outcome)

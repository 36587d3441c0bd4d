"""The job queue: accepted upscale tasks on their way to a worker, and their outcomes on the way back.

The queue is also where admission lives, because it knows how much accepted work is open:
:meth:`JobQueue.enqueue` admits, claims and queues a job as one step (a full queue is a 429 and a
used taskUUID a ``conflictTaskUUID``, both before anything is acknowledged), and frees the job's
place when it ends, whatever happened. A job is plain data (:class:`UpscaleJob`) that says everything
a worker needs, so it can travel to another process. Implementations: ``local.py`` runs jobs in this
process; the cluster's queue (Redis Streams) hands them to worker processes. Only
:mod:`upscale_server.backends` builds them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from upscale_server.protocol import Outcome, UpscaleTask
from upscale_server.vocabulary import ImageFormat


@dataclass(frozen=True, slots=True)
class UpscaleJob:
    """An accepted upscale task: the parsed task, the base URL its image URLs are built on, the WebSocket
    session it came in (None for REST), the image UUIDs its output and inline input will be stored
    under, chosen once at acceptance so that every attempt at the job reports the same ones, and the
    tenant that sent it (its record's owner)."""

    task: UpscaleTask
    base_url: str
    session: str | None = None
    output_uuid: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    input_uuid: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    owner: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "task": dataclasses.asdict(self.task),
                "base_url": self.base_url,
                "session": self.session,
                "output_uuid": self.output_uuid,
                "input_uuid": self.input_uuid,
                "owner": self.owner,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> UpscaleJob:
        data: dict[str, Any] = json.loads(text)
        fields = dict(data["task"])
        fields["output_format"] = ImageFormat(fields["output_format"])
        return cls(
            task=UpscaleTask(**fields),
            base_url=data["base_url"],
            session=data["session"],
            output_uuid=data["output_uuid"],
            input_uuid=data["input_uuid"],
            owner=data.get("owner", ""),
        )


Executor = Callable[[UpscaleJob], Coroutine[object, object, Outcome]]


@dataclass(frozen=True)
class QueueFigures:
    """A shared queue's levels for ``/metrics`` (a cluster's; the single process counts its own)."""

    waiting: int
    running: int
    oldest_wait_seconds: float
    redeliveries: int
    dead_lettered: int
    workers_alive: int


class JobQueue(Protocol):
    """Where accepted jobs wait for a worker, and how many may be open at once."""

    def start(self, execute: Executor, give_up: Executor) -> None:
        """Run queued jobs with ``execute`` (which records the outcome and notifies) from now on; a queue
        that only hands jobs to other processes (a cluster's API node) is never started. ``give_up``
        records a job that will not be run again as failed (it crashed the workers that ran it)."""
        ...

    async def enqueue(self, job: UpscaleJob) -> asyncio.Future[Outcome | None]:
        """Admit, claim and queue ``job``: QueueFullError (429) when every place is taken,
        ConflictTaskUUIDError when its taskUUID is in use; either way nothing is left behind. Once this
        returns the job is durably accepted (it will run even if this process dies).

        The future resolves when the job ended: with its outcome, or with None when the outcome was
        produced in another process (it is in the task records, and a job with a ``session`` has been
        delivered to that session already)."""
        ...

    @property
    def in_flight(self) -> int:
        """Places taken: jobs admitted and not finished (queued or running), as this queue sees them."""
        ...

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the jobs still running here, at shutdown."""
        ...

"""Task records in Redis: one hash per task (``task:<uuid>``), shared by every node and worker.

A queued task's hash is written by the enqueue script (:mod:`.jobs`) together with its job; a task
run on the API node itself (``imageUpload``) is claimed here. Either way the hash has no expiry while
the task is open (an upload's claim has a generous one: the node that runs it may die) and the result
TTL once finished: that window is the ``conflictTaskUUID`` and ``getResponse`` window, as on one node.
Finishing is :data:`.scripts.FINISH`: the first finisher wins and wakes whoever waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from upscale_server import json_text
from upscale_server.cluster import scripts
from upscale_server.cluster.connect import translated
from upscale_server.cluster.keys import Keys
from upscale_server.storage import JsonObject, TaskRecord, TaskStatus

log = logging.getLogger(__name__)

#: Frames kept per session stream (approximately: Redis trims in whole nodes).
SESSION_FRAMES = 256


class RedisTaskRecords:
    """:class:`~upscale_server.storage.TaskRecords` on Redis; blocking, thread-safe."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        node: str,
        result_ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self.node = node
        self.result_ttl_seconds = result_ttl_seconds
        self._clock = clock
        self._claim = client.register_script(scripts.CLAIM)
        self._finish_script = client.register_script(scripts.FINISH)

    @translated("task store (Redis)")
    def claim(self, task_uuid: str, task_type: str, delivery: str, owner: str = "") -> bool:
        ttl = max(self.result_ttl_seconds, 600)
        claimed = self._claim(
            keys=[self.keys.task(task_uuid)], args=[task_type, delivery, self._clock(), self.node, ttl, owner]
        )
        return bool(claimed)

    def complete(self, task_uuid: str, item: JsonObject) -> bool:
        return self._finish(task_uuid, "success", "item", item)

    def fail(self, task_uuid: str, error: JsonObject) -> bool:
        return self._finish(task_uuid, "error", "error", error)

    @translated("task store (Redis)")
    def get(self, task_uuid: str) -> TaskRecord | None:
        fields = cast(dict[str, str], self.client.hgetall(self.keys.task(task_uuid)))
        if not fields or "status" not in fields:
            return None
        finished = _float(fields.get("finished"))
        return TaskRecord(
            task_uuid=task_uuid,
            task_type=fields.get("type", ""),
            delivery=fields.get("delivery", "sync"),
            status=cast(TaskStatus, fields["status"]),
            item=_load(fields.get("item")),
            error=_load(fields.get("error")),
            created_at=_float(fields.get("created")) or 0.0,
            finished_at=finished,
            expires_at=None if finished is None else finished + self.result_ttl_seconds,
            owner=fields.get("owner", ""),
        )

    def fail_unfinished(self, error_factory: Callable[[TaskRecord], JsonObject]) -> int:
        """Nothing to do: an open task in a cluster belongs to a worker or to the queue, and a worker that
        died only means another one runs it."""
        return 0

    def sweep(self, now: float | None = None) -> int:
        """Nothing to do: Redis expires finished records itself."""
        return 0

    @translated("task store (Redis)")
    def _finish(self, task_uuid: str, status: TaskStatus, field: str, value: JsonObject) -> bool:
        payload = _dump(value)  # not JSON: raises before anything is written
        recorded = self._finish_script(
            keys=[self.keys.task(task_uuid)],
            args=[
                status,
                field,
                payload,
                self._clock(),
                self.result_ttl_seconds,
                self.keys.prefix,
                task_uuid,
                SESSION_FRAMES,
            ],
        )
        if not recorded:
            log.info("task %s was already finished: this %s result is dropped (the first one stays)", task_uuid, status)
        return bool(recorded)


def _dump(value: JsonObject) -> str:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return json_text.dump_text(value)


def _load(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    value = json_text.loads(text)
    return value if isinstance(value, dict) else None


def _float(text: str | None) -> float | None:
    return float(text) if text else None

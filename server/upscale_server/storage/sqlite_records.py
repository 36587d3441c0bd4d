"""Task records in SQLite: every task the API accepted, claimed before it runs, finished exactly once.

Finished rows stay pollable for ``result_ttl_seconds`` (sync tasks too: the Python SDK polls a sync
task's UUID after a ``conflictTaskUUID``); ``processing`` rows never expire, and at start-up
:meth:`SqliteTaskRecords.fail_unfinished` turns the ones a previous process left behind into errors,
so a client polling across a restart gets an answer instead of "processing" forever.

The stored items are the wire JSON objects as the task layer built them; this module does not know
their shape.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import cast

from upscale_server import json_text
from upscale_server.storage import JsonObject, TaskRecord, TaskStatus
from upscale_server.storage.sqlite import Database

logger = logging.getLogger(__name__)


class SqliteTaskRecords:
    """Task rows in ``db``; safe to share between threads and between processes on the same file."""

    def __init__(
        self,
        db: Database,
        *,
        result_ttl_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if result_ttl_seconds <= 0:
            raise ValueError(f"result_ttl_seconds must be positive, got {result_ttl_seconds}")
        self.db = db
        self.result_ttl_seconds = result_ttl_seconds
        self._clock = clock

    def claim(self, task_uuid: str, task_type: str, delivery: str, owner: str = "") -> bool:
        """Record a new ``processing`` task; False if the UUID is taken (answer ``conflictTaskUUID``).

        One statement, so the check and the insert cannot interleave with another claim, in this process
        or another. A finished record whose result expired but was not swept yet no longer counts: it is
        replaced in place.
        """
        changed = self.db.execute(
            "INSERT INTO tasks (task_uuid, task_type, delivery, status, created_at, owner)"
            " VALUES (:uuid, :type, :delivery, 'processing', :now, :owner)"
            " ON CONFLICT (task_uuid) DO UPDATE SET"
            "   task_type = excluded.task_type, delivery = excluded.delivery, status = 'processing',"
            "   owner = excluded.owner,"
            "   item = NULL, error = NULL, created_at = excluded.created_at, finished_at = NULL,"
            "   expires_at = NULL"
            " WHERE tasks.expires_at IS NOT NULL AND tasks.expires_at <= :now",
            {"uuid": task_uuid, "type": task_type, "delivery": delivery, "now": self._clock(), "owner": owner},
        )
        claimed = changed == 1
        if not claimed:
            logger.info("Task %s: taskUUID already in use", task_uuid)
        return claimed

    def complete(self, task_uuid: str, item: JsonObject) -> bool:
        """Finish a claimed task with its result item (a JSON object); pollable for the result TTL."""
        return self._finish(task_uuid, "success", item=item)

    def fail(self, task_uuid: str, error: JsonObject) -> bool:
        """Finish a claimed task with its error item (a JSON object); pollable for the result TTL."""
        return self._finish(task_uuid, "error", error=error)

    def get(self, task_uuid: str) -> TaskRecord | None:
        """The task's record, or None when it is unknown or its result expired."""
        row = self.db.query_one("SELECT * FROM tasks WHERE task_uuid = ?", (task_uuid,))
        if row is None:
            return None
        record = _from_row(row)
        if record.expires_at is not None and record.expires_at <= self._clock():
            return None
        return record

    def fail_unfinished(self, error_factory: Callable[[TaskRecord], JsonObject]) -> int:
        """Turn every ``processing`` task into an error; call once at start-up, before accepting work.

        Those tasks belonged to a process that is gone, so nothing will ever finish them. ``error_factory``
        builds each error item (it runs inside the transaction: keep it pure and quick).
        """
        now = self._clock()
        with self.db.transaction() as conn:
            rows = conn.execute("SELECT * FROM tasks WHERE status = 'processing'").fetchall()
            for row in rows:
                record = _from_row(row)
                conn.execute(
                    "UPDATE tasks SET status = 'error', error = ?, finished_at = ?, expires_at = ? WHERE task_uuid = ?",
                    (_dump(error_factory(record)), now, now + self.result_ttl_seconds, record.task_uuid),
                )
        if rows:
            logger.warning("Marked %d tasks interrupted by a restart as failed", len(rows))
        return len(rows)

    def sweep(self, now: float | None = None) -> int:
        """Delete finished records whose result expired; returns how many."""
        now = self._clock() if now is None else now
        removed = self.db.execute(
            "DELETE FROM tasks WHERE expires_at IS NOT NULL AND expires_at <= ?",
            (now,),
        )
        if removed:
            logger.info("Swept %d expired task results", removed)
        return removed

    def _finish(
        self,
        task_uuid: str,
        status: TaskStatus,
        *,
        item: JsonObject | None = None,
        error: JsonObject | None = None,
    ) -> bool:
        # Serialise before touching the database: an item that is not JSON raises here and the caller can
        # still fail() the task, instead of the row staying "processing" until the next restart.
        item_json = None if item is None else _dump(item)
        error_json = None if error is None else _dump(error)
        now = self._clock()
        changed = self.db.execute(
            "UPDATE tasks SET status = ?, item = ?, error = ?, finished_at = ?, expires_at = ?"
            " WHERE task_uuid = ? AND status = 'processing'",
            (status, item_json, error_json, now, now + self.result_ttl_seconds, task_uuid),
        )
        if changed == 0:
            # Never claimed, or finished twice: a bug in the caller, but not one worth failing a response
            # that is already computed. The first outcome stays.
            logger.warning("Task %s: not processing, %s result dropped", task_uuid, status)
            return False
        logger.debug("Task %s: %s", task_uuid, status)
        return True


def _dump(value: JsonObject) -> str:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return json_text.dump_text(value, ensure_ascii=False)


def _load(text: str | None) -> JsonObject | None:
    if text is None:
        return None
    value = json_text.loads(text)
    return value if isinstance(value, dict) else None


def _from_row(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        task_uuid=row["task_uuid"],
        task_type=row["task_type"],
        delivery=row["delivery"],
        status=cast(TaskStatus, row["status"]),
        item=_load(row["item"]),
        error=_load(row["error"]),
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        expires_at=row["expires_at"],
        owner=row["owner"],
    )

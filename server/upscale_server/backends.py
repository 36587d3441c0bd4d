"""The backends of a server process: where task records, images, jobs and WebSocket sessions live.

The one module that names implementations; everything else holds the interfaces of
:mod:`upscale_server.storage`, :mod:`upscale_server.queue` and :mod:`upscale_server.sessions`.
Today there is one set: a single process with a SQLite file and an image folder in the data
directory, jobs run in this process, sessions kept in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from upscale_server.config import Settings
from upscale_server.errors import TaskInterruptedError, error_item
from upscale_server.protocol import with_status
from upscale_server.queue import JobQueue
from upscale_server.queue.local import LocalJobQueue
from upscale_server.sessions import SessionStore
from upscale_server.sessions.local import LocalSessionStore
from upscale_server.storage import ImageStorage, JsonObject, TaskRecord, TaskRecords
from upscale_server.storage.local_images import LocalImageStore
from upscale_server.storage.sqlite import open_database
from upscale_server.storage.sqlite_records import SqliteTaskRecords

log = logging.getLogger(__name__)

#: The SQLite file and the image folder inside the data directory.
DATABASE_NAME = "upscale.sqlite3"
IMAGES_FOLDER = "images"


@dataclass(frozen=True)
class Backends:
    images: ImageStorage
    records: TaskRecords
    jobs: JobQueue
    sessions: SessionStore
    close: Callable[[], None]


def open_local_backends(settings: Settings) -> Backends:
    """The single-process backends in ``settings.data_dir``.

    A task the previous process was running can never finish now (its worker died with it), so it
    is marked failed here, before anyone can poll it: clients get ``taskInterrupted`` instead of
    "processing" forever.
    """
    data_dir = settings.data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(data_dir / DATABASE_NAME)
    try:
        images = LocalImageStore(db, data_dir / IMAGES_FOLDER, retention_seconds=settings.image_retention_days * 86400)
        records = SqliteTaskRecords(db, result_ttl_seconds=settings.result_ttl_seconds)
        interrupted = records.fail_unfinished(interrupted_error)
    except BaseException:
        db.close()
        raise
    if interrupted:
        log.warning("%d task(s) were running when the server stopped; marked as failed", interrupted)
    return Backends(
        images=images,
        records=records,
        jobs=LocalJobQueue(capacity=settings.max_queue),
        sessions=LocalSessionStore(resume_seconds=settings.session_resume_seconds),
        close=db.close,
    )


def interrupted_error(record: TaskRecord) -> JsonObject:
    """The error item a task gets when the process running it is gone."""
    item = error_item(TaskInterruptedError(), task_type=record.task_type, task_uuid=record.task_uuid)
    return with_status(item, "error")

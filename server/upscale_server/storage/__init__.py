"""Persistence: stored images and task results in SQLite plus files, and the sweeper that expires them.

No web framework here; every call blocks, so async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

from upscale_server.storage.db import Database, DatabaseVersionError, open_database
from upscale_server.storage.images import CONTENT_TYPES, ImageStore, StoredImage, normalize_uuid
from upscale_server.storage.results import TaskRecord, TaskStore
from upscale_server.storage.sweeper import sweep_forever

__all__ = [
    "CONTENT_TYPES",
    "Database",
    "DatabaseVersionError",
    "ImageStore",
    "StoredImage",
    "TaskRecord",
    "TaskStore",
    "normalize_uuid",
    "open_database",
    "sweep_forever",
]

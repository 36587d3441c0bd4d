"""Where tasks and images are kept: the narrow interfaces the rest of the server uses.

Two stores, each a small protocol: :class:`ImageStorage` (uploads and upscale outputs, kept 30 days
after their last use) and :class:`TaskRecords` (every accepted task, so ``getResponse`` and
``conflictTaskUUID`` work). The single process uses SQLite plus local files (``sqlite.py``,
``local_images.py``, ``sqlite_records.py``), a cluster Redis plus S3 (:mod:`upscale_server.cluster`);
only :mod:`upscale_server.backends` builds them, so a backend changes without touching a task.

Every method blocks (file and database I/O): async callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from upscale_server.vocabulary import ImageFormat, canonical_uuid

ImageKind = Literal["upload", "output"]
TaskStatus = Literal["processing", "success", "error"]
JsonObject = dict[str, Any]


#: An explicit ``ttl`` longer than this caps nothing a store keeps (the retention after last use is far
#: shorter); clamped so that any integer a client sends is a finite time.
LONGEST_TTL_SECONDS = 100 * 365 * 86400.0


def ttl_cap(now: float, ttl_seconds: float | None) -> float | None:
    """When an image with an explicit ``ttl`` expires whatever its use (None: no cap); ValueError when
    the ttl is not positive."""
    if ttl_seconds is None:
        return None
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
    return now + min(ttl_seconds, LONGEST_TTL_SECONDS)


def image_uuid_for(image_uuid: str | None) -> str:
    """The canonical UUID a new image is stored under: ``image_uuid`` (ValueError when it is not a
    hyphenated UUID), or a fresh uuid4."""
    if image_uuid is None:
        return str(uuid.uuid4())
    canonical = canonical_uuid(image_uuid)
    if canonical is None:
        raise ValueError(f"not a UUID: {image_uuid!r}")
    return canonical


@dataclass(frozen=True)
class StoredImage:
    """One stored image as recorded when it was looked up (times are clock seconds).

    ``local_path`` is the file when the storage keeps images on this machine (the API then serves it
    straight from disk), None when the bytes live elsewhere and must be read with ``read_bytes``.
    """

    uuid: str
    format: ImageFormat
    kind: ImageKind
    size_bytes: int
    width: int | None
    height: int | None
    created_at: float
    last_used_at: float
    expires_at: float | None
    local_path: Path | None = None

    @property
    def extension(self) -> str:
        return self.format.extension

    @property
    def content_type(self) -> str:
        return self.format.media_type


class ImageStorage(Protocol):
    """Stored images. A use refreshes an image's life; an explicit ``ttl_seconds`` caps it regardless."""

    def put(
        self,
        data: bytes,
        *,
        format: ImageFormat,
        kind: ImageKind,
        ttl_seconds: float | None = None,
        image_uuid: str | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> StoredImage:
        """Store already-encoded bytes under a fresh UUID (or ``image_uuid``, which must be new)."""
        ...

    def get(self, image_uuid: str, *, touch: bool = True) -> StoredImage | None:
        """The live image with this UUID (``touch`` records a use), or None: unknown, malformed or expired."""
        ...

    def read_bytes(self, image: StoredImage) -> bytes:
        """The image's bytes; ``FileNotFoundError`` when it expired and was swept since ``get``."""
        ...

    def presigned_url(self, image: StoredImage) -> str | None:
        """A URL the client may fetch the image from directly (an object store's presigned URL), or None
        when the API serves the bytes itself."""
        ...

    def sweep(self, now: float | None = None) -> int:
        """Delete what expired; returns how many images went."""
        ...

    def stats(self) -> tuple[int, int]:
        """(number of stored images, their total size in bytes)."""
        ...


@dataclass(frozen=True)
class TaskRecord:
    """One accepted task. ``item`` is set on success, ``error`` on failure; times are clock seconds."""

    task_uuid: str
    task_type: str
    delivery: str
    status: TaskStatus
    item: JsonObject | None
    error: JsonObject | None
    created_at: float
    finished_at: float | None
    expires_at: float | None
    #: The tenant that sent the task (:func:`upscale_server.api.auth.owner_of`); '' in open mode.
    owner: str = ""


class TaskRecords(Protocol):
    """Every task the API accepted, claimed before it runs and finished exactly once.

    Finished records stay readable for the result TTL; ``processing`` ones never expire.
    """

    def claim(self, task_uuid: str, task_type: str, delivery: str, owner: str = "") -> bool:
        """Record a new ``processing`` task of ``owner``, atomically with the check; False when the UUID is
        in use (by any owner: taskUUIDs are one namespace per server)."""
        ...

    def complete(self, task_uuid: str, item: JsonObject) -> bool:
        """Finish a claimed task with its result item (a JSON object). False when it was finished already
        (the first outcome stays): only the caller that got True may notify anyone."""
        ...

    def fail(self, task_uuid: str, error: JsonObject) -> bool:
        """Finish a claimed task with its error item (a JSON object); False as for :meth:`complete`."""
        ...

    def get(self, task_uuid: str) -> TaskRecord | None:
        """The task's record, or None when it is unknown or its result expired."""
        ...

    def fail_unfinished(self, error_factory: Callable[[TaskRecord], JsonObject]) -> int:
        """Turn every ``processing`` task into an error (a single process starting again: nothing
        will ever finish them); returns how many."""
        ...

    def sweep(self, now: float | None = None) -> int:
        """Delete finished records whose result expired; returns how many."""
        ...

"""Stored images: uploads (``imageUpload``) and upscale outputs, files on disk plus a row each.

Runware keeps an image for 30 days after its *last use*, so every lookup that uses an image refreshes
``last_used_at``; an optional explicit ``expires_at`` (the request's ``ttl``) caps the life regardless.

Paths are derived from the canonical UUID only (``<root>/<uuid[:2]>/<uuid>.<ext>``), never from anything
a client sent, so no request can name a file outside the image folder.

Ordering, chosen so a crash at any point leaves nothing that is served wrongly or kept forever:
``put`` writes (and fsyncs) a temp file, commits the row, then renames the file into place (a row whose
file is not there yet reads as "not found"; a leftover temp file is removed by ``sweep`` after an hour).
``sweep`` deletes the file first and the row second, so a file never outlives its row.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sqlite3
import tempfile
import time
import uuid as uuid_module
from collections.abc import Callable
from pathlib import Path
from typing import Literal, cast

from upscale_server.storage.db import Database

logger = logging.getLogger(__name__)

Extension = Literal["jpg", "png", "webp"]
ImageKind = Literal["upload", "output"]

CONTENT_TYPES: dict[str, str] = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

#: Temp files older than this are leftovers of a crashed write, not writes in progress.
ORPHAN_TEMP_AGE_SECONDS = 3600.0

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_TEMP_SUFFIX = ".tmp"


def normalize_uuid(value: str) -> str | None:
    """The canonical lowercase form of a hyphenated UUID string, or None if ``value`` is not one.

    Only the 8-4-4-4-12 form is accepted (any version: Runware clients send v4 and v7). Braces, URNs and
    bare hex are refused on purpose: a bare 32-hex string might as well be base64 image data.
    """
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        return None
    return value.lower()


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """One stored image as recorded when it was looked up (times are clock seconds)."""

    uuid: str
    extension: Extension
    content_type: str
    path: Path
    kind: ImageKind
    size_bytes: int
    width: int | None
    height: int | None
    created_at: float
    last_used_at: float
    expires_at: float | None


class ImageStore:
    """Files under ``root`` plus their rows in ``db``; safe to share between threads.

    ``retention_seconds`` is the life of an image since its last use (``image_retention_days``).
    """

    def __init__(
        self,
        db: Database,
        root: Path,
        *,
        retention_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention_seconds <= 0:
            raise ValueError(f"retention_seconds must be positive, got {retention_seconds}")
        self.db = db
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.retention_seconds = retention_seconds
        self._clock = clock

    def path_for(self, image_uuid: str, extension: Extension) -> Path:
        """Where the file of a (canonical) UUID lives; a shard folder per first two hex digits."""
        return self.root / image_uuid[:2] / f"{image_uuid}.{extension}"

    def put(
        self,
        data: bytes,
        *,
        extension: Extension,
        kind: ImageKind,
        ttl_seconds: float | None = None,
        image_uuid: str | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> StoredImage:
        """Store already-encoded image bytes and return the record.

        ``ttl_seconds`` caps the life whatever the use; ``image_uuid`` (default: a fresh uuid4) must be a
        hyphenated UUID not already stored, else ``ValueError``. The bytes are not decoded here: the
        caller encoded them and knows the format.
        """
        if extension not in CONTENT_TYPES:
            raise ValueError(f"unsupported extension {extension!r}")
        if kind not in ("upload", "output"):
            raise ValueError(f"unknown image kind {kind!r}")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        if image_uuid is None:
            canonical = str(uuid_module.uuid4())
        else:
            normalized = normalize_uuid(image_uuid)
            if normalized is None:
                raise ValueError(f"not a UUID: {image_uuid!r}")
            canonical = normalized

        final = self.path_for(canonical, extension)
        final.parent.mkdir(exist_ok=True)
        temp = self._write_temp(final.parent, canonical, data)
        now = self._clock()
        image = StoredImage(
            uuid=canonical,
            extension=extension,
            content_type=CONTENT_TYPES[extension],
            path=final,
            kind=kind,
            size_bytes=len(data),
            width=width,
            height=height,
            created_at=now,
            last_used_at=now,
            expires_at=None if ttl_seconds is None else now + ttl_seconds,
        )
        try:
            # The primary key, not a check-then-write, refuses a duplicate UUID: the existing file is
            # never overwritten because the rename below only happens once the row is ours.
            self.db.execute(
                "INSERT INTO images (uuid, extension, content_type, kind, size_bytes, width, height,"
                " created_at, last_used_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    image.uuid,
                    image.extension,
                    image.content_type,
                    image.kind,
                    image.size_bytes,
                    image.width,
                    image.height,
                    image.created_at,
                    image.last_used_at,
                    image.expires_at,
                ),
            )
        except sqlite3.IntegrityError as exc:
            temp.unlink(missing_ok=True)
            raise ValueError(f"image {canonical} already exists") from exc
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        try:
            temp.replace(final)
        except BaseException:
            # Undo the row too: nothing may point at a file that is not there.
            self.db.execute("DELETE FROM images WHERE uuid = ?", (canonical,))
            temp.unlink(missing_ok=True)
            raise
        logger.debug("Stored %s image %s (%d bytes)", kind, canonical, len(data))
        return image

    def get(self, image_uuid: str, *, touch: bool = True) -> StoredImage | None:
        """The live image with this UUID, or None (unknown, malformed, expired or its file is gone).

        ``touch`` records a use, which extends the image's life by the retention period; pass False for
        look-ups that are not uses (listing, metrics).
        """
        canonical = normalize_uuid(image_uuid)
        if canonical is None:
            return None
        now = self._clock()
        # One transaction for read, check and touch, so a concurrent sweep cannot delete the image
        # between our expiry check and the touch that keeps it alive.
        with self.db.transaction() as conn:
            row = conn.execute("SELECT * FROM images WHERE uuid = ?", (canonical,)).fetchone()
            if row is None or self._is_expired(row, now):
                return None
            image = self._from_row(row)
            if not image.path.is_file():
                logger.warning("Image %s has a row but no file at %s", canonical, image.path)
                return None
            if touch:
                conn.execute("UPDATE images SET last_used_at = ? WHERE uuid = ?", (now, canonical))
                image = dataclasses.replace(image, last_used_at=now)
        return image

    def read_bytes(self, image: StoredImage) -> bytes:
        """The file's bytes. Raises ``FileNotFoundError`` if the image expired and was swept since ``get``."""
        return image.path.read_bytes()

    def sweep(self, now: float | None = None) -> int:
        """Delete expired images (file, then row) and stale temp files; returns how many images went."""
        now = self._clock() if now is None else now
        candidates = self.db.query(
            "SELECT uuid FROM images WHERE last_used_at <= ? OR expires_at <= ?",
            (now - self.retention_seconds, now),
        )
        removed = 0
        for candidate in candidates:
            # Per image, re-checked under the transaction: a get() may have touched it since the query.
            with self.db.transaction() as conn:
                row = conn.execute("SELECT * FROM images WHERE uuid = ?", (candidate["uuid"],)).fetchone()
                if row is None or not self._is_expired(row, now):
                    continue
                image = self._from_row(row)
                try:
                    image.path.unlink(missing_ok=True)
                except OSError:
                    # Keep the row so the next sweep retries; a row without a deletable file is the
                    # lesser harm than a file nothing points to.
                    logger.exception("Could not delete expired image file %s", image.path)
                    continue
                conn.execute("DELETE FROM images WHERE uuid = ?", (image.uuid,))
                removed += 1
        temps = self._sweep_temp_files(now)
        if removed or temps:
            logger.info("Swept %d expired images and %d stale temp files", removed, temps)
        return removed

    def stats(self) -> tuple[int, int]:
        """(number of stored images, their total size in bytes), expired-but-unswept ones included."""
        row = self.db.query_one("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM images")
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # ------------------------------------------------------------------ internals

    def _is_expired(self, row: sqlite3.Row, now: float) -> bool:
        if row["last_used_at"] + self.retention_seconds <= now:
            return True
        return row["expires_at"] is not None and row["expires_at"] <= now

    def _from_row(self, row: sqlite3.Row) -> StoredImage:
        extension = cast(Extension, row["extension"])
        return StoredImage(
            uuid=row["uuid"],
            extension=extension,
            content_type=row["content_type"],
            path=self.path_for(row["uuid"], extension),
            kind=cast(ImageKind, row["kind"]),
            size_bytes=row["size_bytes"],
            width=row["width"],
            height=row["height"],
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
            expires_at=row["expires_at"],
        )

    @staticmethod
    def _write_temp(folder: Path, image_uuid: str, data: bytes) -> Path:
        # Same folder as the final file so the rename is atomic on one file system. The dot
        # prefix keeps it out of anything that serves or lists <uuid>.<ext> files.
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{image_uuid}.", suffix=_TEMP_SUFFIX)
        temp = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                # Without fsync a power cut after the rename can leave a zero-length file under a valid row.
                os.fsync(handle.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    def _sweep_temp_files(self, now: float) -> int:
        removed = 0
        cutoff = now - ORPHAN_TEMP_AGE_SECONDS
        for shard in self.root.iterdir():
            if not (shard.is_dir() and _SHARD_RE.fullmatch(shard.name)):
                continue
            for temp in shard.glob(f".*{_TEMP_SUFFIX}"):
                try:
                    if temp.stat().st_mtime <= cutoff:
                        temp.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue  # another sweeper or the writer itself got there first
                except OSError:
                    logger.exception("Could not delete stale temp file %s", temp)
        return removed

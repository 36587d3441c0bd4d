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
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from upscale_server.storage import ImageKind, StoredImage, image_uuid_for, ttl_cap
from upscale_server.storage.sqlite import Database
from upscale_server.vocabulary import ImageFormat, canonical_uuid, staged_writer

logger = logging.getLogger(__name__)

#: Temp files older than this are leftovers of a crashed write, not writes in progress.
ORPHAN_TEMP_AGE_SECONDS = 3600.0

_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_TEMP_SUFFIX = ".tmp"


class LocalImageStore:
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

    def path_for(self, image_uuid: str, fmt: ImageFormat) -> Path:
        """Where the file of a (canonical) UUID lives; a shard folder per first two hex digits."""
        return self.root / image_uuid[:2] / f"{image_uuid}.{fmt.extension}"

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
        """Store already-encoded image bytes and return the record.

        ``ttl_seconds`` caps the life whatever the use; ``image_uuid`` (default: a fresh uuid4) must be a
        hyphenated UUID not already stored, else ``ValueError``. The bytes are not decoded here: the
        caller encoded them and knows the format.
        """
        fmt = ImageFormat(format)
        if kind not in ("upload", "output"):
            raise ValueError(f"unknown image kind {kind!r}")
        canonical = image_uuid_for(image_uuid)
        final = self.path_for(canonical, fmt)
        now = self._clock()
        image = StoredImage(
            uuid=canonical,
            format=fmt,
            kind=kind,
            size_bytes=len(data),
            width=width,
            height=height,
            created_at=now,
            last_used_at=now,
            expires_at=ttl_cap(now, ttl_seconds),
            local_path=final,
        )
        inserted = False
        try:
            # The temp file (beside the final one) is fsynced and renamed into place only once the row
            # is committed. The primary key, not a check-then-write, refuses a duplicate UUID, so an
            # existing file is never overwritten.
            with staged_writer(final, suffix=_TEMP_SUFFIX, mode=None) as handle:  # users' images: owner-only
                handle.write(data)
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
                inserted = True
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"image {canonical} already exists") from exc
        except BaseException:
            if inserted:  # the rename failed: nothing may point at a file that is not there
                self.db.execute("DELETE FROM images WHERE uuid = ?", (canonical,))
            raise
        logger.debug("Stored %s image %s (%d bytes)", kind, canonical, len(data))
        return image

    def get(self, image_uuid: str, *, touch: bool = True) -> StoredImage | None:
        """The live image with this UUID, or None (unknown, malformed, expired or its file is gone).

        ``touch`` records a use, which extends the image's life by the retention period; pass False for
        look-ups that are not uses (listing, metrics).
        """
        canonical = canonical_uuid(image_uuid)
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
            if not self.path_for(image.uuid, image.format).is_file():
                logger.warning("Image %s has a row but no file at %s", canonical, image.local_path)
                return None
            if touch:
                conn.execute("UPDATE images SET last_used_at = ? WHERE uuid = ?", (now, canonical))
                image = dataclasses.replace(image, last_used_at=now)
        return image

    def read_bytes(self, image: StoredImage) -> bytes:
        """The file's bytes. Raises ``FileNotFoundError`` if the image expired and was swept since ``get``."""
        return self.path_for(image.uuid, image.format).read_bytes()

    def presigned_url(self, image: StoredImage) -> str | None:
        """None: the API serves local files itself."""
        return None

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
                path = self.path_for(image.uuid, image.format)
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    # Keep the row so the next sweep retries; a row without a deletable file is the
                    # lesser harm than a file nothing points to.
                    logger.exception("Could not delete expired image file %s", path)
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
        fmt = ImageFormat.from_extension(row["extension"])
        if fmt is None:  # the schema's CHECK allows only the three extensions
            raise ValueError(f"image {row['uuid']} has an unknown extension {row['extension']!r}")
        return StoredImage(
            uuid=row["uuid"],
            format=fmt,
            kind=cast(ImageKind, row["kind"]),
            size_bytes=row["size_bytes"],
            width=row["width"],
            height=row["height"],
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
            expires_at=row["expires_at"],
            local_path=self.path_for(row["uuid"], fmt),
        )

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

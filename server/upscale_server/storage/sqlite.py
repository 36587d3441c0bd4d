"""The SQLite database behind the image and task stores: one connection, one lock, WAL.

Why one shared connection and a lock rather than a pool: the server writes little (a row per upload,
output and task), every call is short, and SQLite allows one writer at a time anyway. A single
connection guarded by a lock makes every multi-statement operation trivially atomic within the process,
while WAL keeps readers in other processes (a CLI, ``sqlite3`` in a shell) from blocking us.

Callers are worker threads (``asyncio.to_thread``), never the event loop: every method here blocks.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Params = Sequence[Any] | Mapping[str, Any]

#: Schema steps; step ``i`` moves ``PRAGMA user_version`` from ``i`` to ``i + 1``. Append, never edit:
#: a database created by an older build replays only the steps it lacks.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # Stored images (uploads and upscale outputs). The file lives at <root>/<uuid[:2]>/<uuid>.<extension>;
        # the path is derived, never stored, so a row can never point outside the image folder.
        """
        CREATE TABLE images (
            uuid          TEXT PRIMARY KEY,
            extension     TEXT NOT NULL CHECK (extension IN ('jpg', 'png', 'webp')),
            content_type  TEXT NOT NULL,
            kind          TEXT NOT NULL CHECK (kind IN ('upload', 'output')),
            size_bytes    INTEGER NOT NULL CHECK (size_bytes >= 0),
            width         INTEGER,
            height        INTEGER,
            created_at    REAL NOT NULL,
            last_used_at  REAL NOT NULL,
            expires_at    REAL
        )
        """,
        "CREATE INDEX images_last_used_at ON images (last_used_at)",
        "CREATE INDEX images_expires_at ON images (expires_at) WHERE expires_at IS NOT NULL",
        # Every task the API accepted, so getResponse answers for sync and async tasks across restarts.
        # item/error hold JSON objects; expires_at stays NULL while the task runs (never forgotten).
        """
        CREATE TABLE tasks (
            task_uuid    TEXT PRIMARY KEY,
            task_type    TEXT NOT NULL,
            delivery     TEXT NOT NULL,
            status       TEXT NOT NULL CHECK (status IN ('processing', 'success', 'error')),
            item         TEXT,
            error        TEXT,
            created_at   REAL NOT NULL,
            finished_at  REAL,
            expires_at   REAL
        )
        """,
        "CREATE INDEX tasks_expires_at ON tasks (expires_at) WHERE expires_at IS NOT NULL",
        "CREATE INDEX tasks_processing ON tasks (status) WHERE status = 'processing'",
    ),
    (
        # The tenant a task belongs to (a hash of the API key that sent it; '' in open mode): getResponse
        # answers only its own key. Rows from before keys separated clients belong to open mode.
        "ALTER TABLE tasks ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


class DatabaseVersionError(RuntimeError):
    """The database file was written by a newer build (its schema version is one we do not know)."""


class Database:
    """A SQLite connection shared by threads; every statement runs under one re-entrant lock.

    Use :meth:`transaction` for anything that reads then writes; :meth:`execute` and :meth:`query`
    are single-statement shortcuts (each statement is atomic on its own).
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self.path = path
        self._conn = connection
        # Re-entrant so a store method can call another one inside its transaction without deadlocking;
        # the depth counter makes a nested transaction() join the outer one instead of issuing BEGIN twice.
        self._lock = threading.RLock()
        self._depth = 0

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and an IMMEDIATE transaction; commit on success, roll back on any exception.

        IMMEDIATE takes SQLite's write lock up front: a deferred transaction that reads first and then
        writes can fail with SQLITE_BUSY when another process wrote in between, with no retry possible.
        Yields the connection; do not keep it after the block.
        """
        with self._lock:
            outermost = self._depth == 0
            if outermost:
                self._conn.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self._conn
            except BaseException:
                self._depth -= 1
                if outermost:
                    self._conn.rollback()
                raise
            self._depth -= 1
            if outermost:
                self._conn.commit()

    def execute(self, sql: str, params: Params = ()) -> int:
        """Run one writing statement in its own transaction; returns the number of rows changed."""
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run one reading statement and return every row (rows are fetched before the lock is released)."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_database(path: Path, *, busy_timeout: float = 5.0) -> Database:
    """Open (creating if needed) the database at ``path`` and bring its schema up to date.

    Safe to call on every start-up and from several processes at once: migrations run inside one
    IMMEDIATE transaction, so a second opener waits and then finds nothing left to do.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: the sqlite3 module must not open transactions behind our back; we issue
    # BEGIN/COMMIT ourselves in Database.transaction(). timeout= installs SQLite's busy handler.
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            # Happens on file systems without shared memory (some network mounts): still correct, just
            # readers and the writer block each other.
            logger.warning("SQLite at %s runs in journal mode %s, not WAL", path, mode)
        # NORMAL is durable enough in WAL mode: a power cut may lose the last commits, never corrupt.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        db = Database(conn, path)
        _migrate(db)
    except BaseException:
        conn.close()
        raise
    return db


def _migrate(db: Database) -> None:
    with db.transaction() as conn:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise DatabaseVersionError(
                f"{db.path} has schema version {version}; this build knows up to {SCHEMA_VERSION}. "
                "It was written by a newer version of the server."
            )
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
            # PRAGMA does not take parameters; the value is our own integer.
            conn.execute(f"PRAGMA user_version = {step + 1}")
            logger.info("Migrated %s to schema version %d", db.path, step + 1)

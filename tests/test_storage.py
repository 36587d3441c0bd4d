"""Storage: real SQLite files in tmp_path, a fake clock moved past expiry, a new Database as a restart."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from upscale_server.storage import TaskRecord
from upscale_server.storage.local_images import ORPHAN_TEMP_AGE_SECONDS, LocalImageStore
from upscale_server.storage.sqlite import MIGRATIONS, SCHEMA_VERSION, Database, DatabaseVersionError, open_database
from upscale_server.storage.sqlite_records import SqliteTaskRecords
from upscale_server.storage.sweeper import sweep_forever
from upscale_server.vocabulary import ImageFormat, canonical_uuid

#: A fixed UUID for parameters: test ids must be the same in every process (pytest-xdist compares them).
SOME_UUID = "3f0d6c3e-9a41-4e0b-8f3c-2d5b7a1e9c44"
DAY = 86400.0
RETENTION = 30 * DAY
TTL = 3600.0


class FakeClock:
    """Starts at the real time so file mtimes and clock times stay comparable."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "upscale.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    database = open_database(db_path)
    yield database
    database.close()


@pytest.fixture
def images(db: Database, tmp_path: Path, clock: FakeClock) -> LocalImageStore:
    return LocalImageStore(db, tmp_path / "data" / "images", retention_seconds=RETENTION, clock=clock)


@pytest.fixture
def tasks(db: Database, clock: FakeClock) -> SqliteTaskRecords:
    return SqliteTaskRecords(db, result_ttl_seconds=TTL, clock=clock)


def schema_version(db: Database) -> int:
    row = db.query_one("PRAGMA user_version")
    assert row is not None
    return int(row[0])


def interrupted(record: TaskRecord) -> dict[str, object]:
    return {"code": "internalServerError", "taskUUID": record.task_uuid, "taskType": record.task_type}


# ---------------------------------------------------------------------------------------------- database


def test_open_database_sets_wal_and_schema_version(db: Database) -> None:
    assert db.query_one("PRAGMA journal_mode")[0] == "wal"  # type: ignore[index]
    assert db.query_one("PRAGMA foreign_keys")[0] == 1  # type: ignore[index]
    assert schema_version(db) == SCHEMA_VERSION


def test_reopening_is_idempotent(db_path: Path) -> None:
    open_database(db_path).close()
    with open_database(db_path) as again:
        assert schema_version(again) == SCHEMA_VERSION
        tables = {row[0] for row in again.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"images", "tasks"} <= tables


def test_newer_schema_is_refused(db_path: Path) -> None:
    open_database(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(DatabaseVersionError):
        open_database(db_path)


def test_tasks_from_before_owners_belong_to_open_mode(db_path: Path, clock: FakeClock) -> None:
    """A database of schema version 1 gains the owner column; its tasks are open mode's ('')."""
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path)
    for statement in MIGRATIONS[0]:
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    raw.execute("INSERT INTO tasks VALUES ('t', 'imageUpload', 'sync', 'processing', NULL, NULL, 0, NULL, NULL)")
    raw.commit()
    raw.close()
    with open_database(db_path) as db:
        records = SqliteTaskRecords(db, result_ttl_seconds=TTL, clock=clock)
        old = records.get("t")
        assert old is not None and old.owner == ""
        assert records.claim("u", "imageUpload", "sync", owner="abc")
        new = records.get("u")
        assert new is not None and new.owner == "abc"


def test_transaction_rolls_back_on_error(db: Database, clock: FakeClock) -> None:
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute(
            "INSERT INTO tasks (task_uuid, task_type, delivery, status, created_at) VALUES (?, ?, ?, ?, ?)",
            ("t", "upscale", "sync", "processing", clock()),
        )
        raise RuntimeError("boom")
    assert db.query("SELECT * FROM tasks") == []


def test_nested_transaction_joins_the_outer_one(db: Database, clock: FakeClock) -> None:
    with pytest.raises(RuntimeError), db.transaction():
        db.execute(
            "INSERT INTO tasks (task_uuid, task_type, delivery, status, created_at) VALUES (?, ?, ?, ?, ?)",
            ("t", "upscale", "sync", "processing", clock()),
        )
        raise RuntimeError("the inner statement must roll back with the outer transaction")
    assert db.query("SELECT * FROM tasks") == []


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize(
    ("extension", "content_type"),
    [("jpg", "image/jpeg"), ("png", "image/png"), ("webp", "image/webp")],
)
def test_put_get_round_trip(images: LocalImageStore, extension: str, content_type: str) -> None:
    data = os.urandom(1000)
    stored = images.put(data, format=ImageFormat.from_extension(extension), kind="upload", width=10, height=20)  # type: ignore[arg-type]
    assert stored.content_type == content_type
    assert stored.local_path == images.root / stored.uuid[:2] / f"{stored.uuid}.{extension}"
    assert uuid.UUID(stored.uuid).version == 4

    got = images.get(stored.uuid)
    assert got is not None
    assert (got.uuid, got.extension, got.content_type, got.kind) == (
        stored.uuid,
        extension,
        content_type,
        "upload",
    )
    assert (got.size_bytes, got.width, got.height, got.expires_at) == (1000, 10, 20, None)
    assert images.read_bytes(got) == data
    # No temp file left beside the image.
    assert [p.name for p in stored.local_path.parent.iterdir()] == [stored.local_path.name]


def test_stored_files_are_readable_by_their_owner_only(images: LocalImageStore) -> None:
    stored = images.put(b"private", format=ImageFormat.PNG, kind="upload")
    assert stored.local_path is not None
    assert stat.S_IMODE(stored.local_path.stat().st_mode) == 0o600


def test_put_with_given_uuid_and_uppercase_lookup(images: LocalImageStore) -> None:
    given = "019C42A0-C3FF-7138-BE83-EE257ABC5331"  # a v7 UUID: Runware clients send those too
    stored = images.put(b"png", format=ImageFormat.PNG, kind="output", image_uuid=given)
    assert stored.uuid == given.lower()
    assert images.get(given) is not None
    assert images.get(given.lower()) is not None


def test_put_refuses_duplicate_uuid_without_touching_the_existing_file(images: LocalImageStore) -> None:
    first = images.put(b"first", format=ImageFormat.PNG, kind="output")
    with pytest.raises(ValueError, match="already exists"):
        images.put(b"second", format=ImageFormat.PNG, kind="output", image_uuid=first.uuid)
    assert first.local_path.read_bytes() == b"first"
    assert list(first.local_path.parent.glob(".*.tmp")) == []
    assert images.stats() == (1, 5)


def test_put_refuses_bad_arguments(images: LocalImageStore) -> None:
    with pytest.raises(ValueError):
        images.put(b"x", format=ImageFormat.PNG, kind="upload", image_uuid="../../etc/passwd")
    with pytest.raises(ValueError):
        images.put(b"x", format="../x", kind="upload")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        images.put(b"x", format=ImageFormat.PNG, kind="upload", ttl_seconds=0)
    assert images.stats() == (0, 0)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not-a-uuid",
        "../../etc",
        "../../etc/passwd",
        "../" + SOME_UUID,
        SOME_UUID + "/../x",
        SOME_UUID.replace("-", ""),
        "{" + SOME_UUID + "}",
        SOME_UUID + ".png",
        SOME_UUID + "\n",
    ],
)
def test_malformed_uuid_is_none(images: LocalImageStore, bad: str) -> None:
    assert canonical_uuid(bad) is None
    assert images.get(bad) is None


def test_path_derives_from_uuid_only(images: LocalImageStore, tmp_path: Path) -> None:
    # Even a row planted with a hostile uuid cannot make get() look outside the root.
    (tmp_path / "secret.png").write_bytes(b"secret")
    stored = images.put(b"ok", format=ImageFormat.PNG, kind="upload")
    assert stored.local_path.resolve().is_relative_to(images.root)
    assert images.get("../../secret") is None
    assert images.get(str(tmp_path / "secret.png")) is None


def test_unknown_uuid_is_none(images: LocalImageStore) -> None:
    assert images.get(str(uuid.uuid4())) is None


def test_touch_extends_life_and_untouched_expires(images: LocalImageStore, clock: FakeClock) -> None:
    used = images.put(b"used", format=ImageFormat.JPG, kind="upload")
    unused = images.put(b"unused", format=ImageFormat.JPG, kind="upload")

    clock.advance(RETENTION - DAY)
    touched = images.get(used.uuid)
    assert touched is not None
    assert touched.last_used_at == clock.now
    # A non-touching lookup does not extend life.
    assert images.get(unused.uuid, touch=False) is not None

    clock.advance(2 * DAY)  # unused: created RETENTION + DAY ago; used: touched 2 days ago
    assert images.get(unused.uuid) is None
    assert images.get(used.uuid) is not None  # touches again

    clock.advance(RETENTION)
    assert images.get(used.uuid) is None


def test_a_ttl_of_any_size_is_a_finite_cap(images: LocalImageStore, clock: FakeClock) -> None:
    """A client may send an integer of hundreds of digits; it caps nothing, and fails nothing."""
    stored = images.put(b"x", format=ImageFormat.PNG, kind="output", ttl_seconds=10**400)
    assert stored.expires_at is not None and stored.expires_at > clock() + RETENTION
    assert images.get(stored.uuid) is not None


def test_explicit_ttl_expires_earlier_even_when_used(images: LocalImageStore, clock: FakeClock) -> None:
    stored = images.put(b"x", format=ImageFormat.WEBP, kind="output", ttl_seconds=120)
    assert stored.expires_at == clock.now + 120
    clock.advance(60)
    assert images.get(stored.uuid) is not None
    clock.advance(60)
    assert images.get(stored.uuid) is None


def test_missing_file_is_none(images: LocalImageStore) -> None:
    stored = images.put(b"x", format=ImageFormat.PNG, kind="upload")
    stored.local_path.unlink()
    assert images.get(stored.uuid) is None


def test_sweep_removes_file_and_row(images: LocalImageStore, db: Database, clock: FakeClock) -> None:
    old = images.put(b"old", format=ImageFormat.PNG, kind="upload")
    short = images.put(b"short", format=ImageFormat.PNG, kind="output", ttl_seconds=10)
    clock.advance(DAY)
    fresh = images.put(b"fresh", format=ImageFormat.PNG, kind="upload")

    assert images.sweep() == 1  # only the ttl one
    assert not short.local_path.exists()
    assert images.stats() == (2, len(b"old") + len(b"fresh"))

    clock.advance(RETENTION - DAY)
    assert images.sweep() == 1
    assert not old.local_path.exists()
    assert fresh.local_path.exists()
    rows = [row["uuid"] for row in db.query("SELECT uuid FROM images")]
    assert rows == [fresh.uuid]
    assert images.sweep() == 0


def test_sweep_tolerates_missing_file(images: LocalImageStore, clock: FakeClock) -> None:
    stored = images.put(b"x", format=ImageFormat.JPG, kind="upload")
    stored.local_path.unlink()
    clock.advance(RETENTION)
    assert images.sweep() == 1
    assert images.stats() == (0, 0)


def test_sweep_keeps_recently_touched(images: LocalImageStore, clock: FakeClock) -> None:
    stored = images.put(b"x", format=ImageFormat.JPG, kind="upload")
    clock.advance(RETENTION - 1)
    assert images.get(stored.uuid) is not None
    clock.advance(2)
    assert images.sweep() == 0
    assert stored.local_path.exists()


def test_sweep_removes_stale_temp_files_only(images: LocalImageStore, clock: FakeClock) -> None:
    stored = images.put(b"x", format=ImageFormat.PNG, kind="upload")
    shard = stored.local_path.parent
    stale = shard / f".{stored.uuid}.abc.tmp"
    recent = shard / f".{stored.uuid}.def.tmp"
    stale.write_bytes(b"partial")
    recent.write_bytes(b"in progress")
    old = clock.now - ORPHAN_TEMP_AGE_SECONDS - 10
    os.utime(stale, (old, old))
    unrelated = images.root / "notes.tmp"
    unrelated.write_bytes(b"not ours")
    os.utime(unrelated, (old, old))

    assert images.sweep() == 0
    assert not stale.exists()
    assert recent.exists()
    assert unrelated.exists()
    assert stored.local_path.exists()


def test_images_survive_restart(db_path: Path, tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "data" / "images"
    with open_database(db_path) as first:
        stored = LocalImageStore(first, root, retention_seconds=RETENTION, clock=clock).put(
            b"keep", format=ImageFormat.PNG, kind="upload"
        )
    with open_database(db_path) as second:
        again = LocalImageStore(second, root, retention_seconds=RETENTION, clock=clock).get(stored.uuid)
    assert again is not None
    assert again.local_path.read_bytes() == b"keep"


# ----------------------------------------------------------------------------------------------- results


def test_claim_conflict(tasks: SqliteTaskRecords) -> None:
    task = str(uuid.uuid4())
    assert tasks.claim(task, "upscale", "async") is True
    assert tasks.claim(task, "imageUpscale", "sync") is False
    record = tasks.get(task)
    assert record is not None
    assert (record.status, record.task_type, record.delivery) == ("processing", "upscale", "async")
    assert record.item is None and record.error is None and record.expires_at is None


def test_concurrent_claims_exactly_one_wins(db_path: Path, clock: FakeClock) -> None:
    task = str(uuid.uuid4())
    results = claim_at_once(db_path, clock, lambda store: store.claim(task, "upscale", "sync"))
    assert sorted(results) == [False] * 7 + [True]


def claim_at_once(
    db_path: Path, clock: FakeClock, claim: Callable[[SqliteTaskRecords], bool], threads: int = 8
) -> list[bool]:
    """``claim(store)`` from ``threads`` threads released together, over two connections to one file
    as well as threads sharing one: atomic at the SQLite level, not only under our lock."""
    dbs = [open_database(db_path), open_database(db_path)]
    stores = [SqliteTaskRecords(d, result_ttl_seconds=TTL, clock=clock) for d in dbs]
    barrier = threading.Barrier(threads)
    results: list[bool] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        barrier.wait()
        outcome = claim(stores[index % 2])
        with lock:
            results.append(outcome)

    started = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    for d in dbs:
        d.close()
    return results


def test_complete_and_get(tasks: SqliteTaskRecords, clock: FakeClock) -> None:
    task = str(uuid.uuid4())
    tasks.claim(task, "upscale", "async")
    clock.advance(5)
    item = {"taskType": "upscale", "taskUUID": task, "imageUUID": str(uuid.uuid4()), "cost": 0.0, "ü": "é"}
    tasks.complete(task, item)
    record = tasks.get(task)
    assert record is not None
    assert record.status == "success"
    assert record.item == item
    assert record.error is None
    assert record.finished_at == clock.now
    assert record.expires_at == clock.now + TTL


def test_fail_and_get(tasks: SqliteTaskRecords) -> None:
    task = str(uuid.uuid4())
    tasks.claim(task, "imageUpscale", "sync")
    error = {"code": "invalidImage", "message": "bad", "taskUUID": task, "taskType": "imageUpscale"}
    tasks.fail(task, error)
    record = tasks.get(task)
    assert record is not None
    assert (record.status, record.item, record.error) == ("error", None, error)


def test_first_outcome_wins(tasks: SqliteTaskRecords, caplog: pytest.LogCaptureFixture) -> None:
    task = str(uuid.uuid4())
    tasks.claim(task, "upscale", "sync")
    tasks.complete(task, {"imageUUID": "a"})
    tasks.fail(task, {"code": "late"})
    tasks.complete(str(uuid.uuid4()), {"imageUUID": "never claimed"})
    record = tasks.get(task)
    assert record is not None and record.item == {"imageUUID": "a"}
    assert "not processing" in caplog.text


def test_non_json_item_raises_and_leaves_task_failable(tasks: SqliteTaskRecords) -> None:
    task = str(uuid.uuid4())
    tasks.claim(task, "upscale", "sync")
    with pytest.raises(TypeError):
        tasks.complete(task, {"bytes": b"not json"})
    tasks.fail(task, {"code": "internalServerError"})
    record = tasks.get(task)
    assert record is not None and record.status == "error"


def test_unknown_task_is_none(tasks: SqliteTaskRecords) -> None:
    assert tasks.get(str(uuid.uuid4())) is None


def test_expired_result_is_none_and_uuid_reusable(tasks: SqliteTaskRecords, clock: FakeClock) -> None:
    task = str(uuid.uuid4())
    tasks.claim(task, "upscale", "sync")
    tasks.complete(task, {"imageUUID": "x"})
    clock.advance(TTL - 1)
    assert tasks.get(task) is not None
    assert tasks.claim(task, "upscale", "sync") is False  # still pollable: still a conflict
    clock.advance(1)
    assert tasks.get(task) is None
    # Expired but not swept yet: a new claim takes the UUID over with a clean record.
    assert tasks.claim(task, "imageUpscale", "async") is True
    record = tasks.get(task)
    assert record is not None
    assert (record.status, record.task_type, record.item, record.expires_at) == (
        "processing",
        "imageUpscale",
        None,
        None,
    )


def test_processing_never_expires(tasks: SqliteTaskRecords, clock: FakeClock) -> None:
    task = str(uuid.uuid4())
    tasks.claim(task, "upscale", "async")
    clock.advance(365 * DAY)
    assert tasks.sweep() == 0
    record = tasks.get(task)
    assert record is not None and record.status == "processing"


def test_results_survive_restart_and_unfinished_fail(db_path: Path, clock: FakeClock) -> None:
    done, running = str(uuid.uuid4()), str(uuid.uuid4())
    with open_database(db_path) as first:
        store = SqliteTaskRecords(first, result_ttl_seconds=TTL, clock=clock)
        store.claim(done, "upscale", "async")
        store.complete(done, {"taskUUID": done, "imageUUID": "img"})
        store.claim(running, "imageUpscale", "async")

    clock.advance(10)
    with open_database(db_path) as second:  # the restart
        store = SqliteTaskRecords(second, result_ttl_seconds=TTL, clock=clock)
        record = store.get(done)
        assert record is not None and record.item == {"taskUUID": done, "imageUUID": "img"}

        assert store.fail_unfinished(interrupted) == 1
        failed = store.get(running)
        assert failed is not None
        assert failed.status == "error"
        assert failed.error == {
            "code": "internalServerError",
            "taskUUID": running,
            "taskType": "imageUpscale",
        }
        assert failed.expires_at == clock.now + TTL
        assert store.get(done) == record  # finished tasks untouched
        assert store.fail_unfinished(interrupted) == 0


def test_task_sweep(tasks: SqliteTaskRecords, db: Database, clock: FakeClock) -> None:
    old, new, running = (str(uuid.uuid4()) for _ in range(3))
    tasks.claim(old, "upscale", "sync")
    tasks.fail(old, {"code": "x"})
    clock.advance(TTL / 2)
    tasks.claim(new, "upscale", "sync")
    tasks.complete(new, {"imageUUID": "y"})
    tasks.claim(running, "upscale", "async")
    clock.advance(TTL / 2)
    assert tasks.sweep() == 1
    remaining = {row["task_uuid"] for row in db.query("SELECT task_uuid FROM tasks")}
    assert remaining == {new, running}


# ----------------------------------------------------------------------------------------------- sweeper


class CountingStore:
    def __init__(self, fail_first: bool = False) -> None:
        self.calls = 0
        self.fail_first = fail_first

    def sweep(self, now: float | None = None) -> int:
        self.calls += 1
        if self.fail_first and self.calls == 1:
            raise OSError("disk hiccup")
        return 1


def test_sweep_forever_runs_survives_errors_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[int, int]:
        good, flaky = CountingStore(), CountingStore(fail_first=True)
        stop = asyncio.Event()
        task = asyncio.create_task(sweep_forever([flaky, good], 0.01, stop=stop))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if flaky.calls >= 3 and good.calls >= 3:
                break
        stop.set()
        await asyncio.wait_for(task, timeout=2)
        return good.calls, flaky.calls

    good_calls, flaky_calls = asyncio.run(scenario())
    assert good_calls >= 3 and flaky_calls >= 3
    assert "disk hiccup" in caplog.text


def test_sweep_forever_sweeps_real_stores(images: LocalImageStore, tasks: SqliteTaskRecords, clock: FakeClock) -> None:
    stored = images.put(b"x", format=ImageFormat.PNG, kind="upload")
    task = str(uuid.uuid4())
    tasks.claim(task, "upscale", "sync")
    tasks.complete(task, {"imageUUID": stored.uuid})
    clock.advance(RETENTION)

    async def scenario() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(sweep_forever([images, tasks], 60, stop=stop))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if images.stats() == (0, 0):
                break
        stop.set()  # must end the 60 s wait at once
        await asyncio.wait_for(runner, timeout=2)

    asyncio.run(scenario())
    assert images.stats() == (0, 0)
    assert not stored.local_path.exists()
    assert tasks.get(task) is None

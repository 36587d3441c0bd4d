"""The backends of a server process: where task records, images, jobs and WebSocket sessions live.

The one module that names implementations; everything else holds the interfaces of
:mod:`upscale_server.storage`, :mod:`upscale_server.queue` and :mod:`upscale_server.sessions`. Two
sets: the single process (a SQLite file and an image folder in the data directory, jobs run in this
process, sessions in memory) and the cluster (Redis and S3, shared by API nodes and workers; see
docs/scaling.md). ``UPSCALE_REDIS_URL`` chooses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from upscale_server.config import Settings
from upscale_server.errors import TaskInterruptedError, error_item
from upscale_server.protocol import with_status
from upscale_server.queue import JobQueue, QueueFigures
from upscale_server.queue.local import LocalJobQueue
from upscale_server.sessions import FrameReader, SessionStore
from upscale_server.sessions.local import LocalSessionStore
from upscale_server.storage import ImageStorage, JsonObject, TaskRecord, TaskRecords
from upscale_server.storage.local_images import LocalImageStore
from upscale_server.storage.sqlite import open_database
from upscale_server.storage.sqlite_records import SqliteTaskRecords

log = logging.getLogger(__name__)

#: The SQLite file and the image folder inside the data directory.
DATABASE_NAME = "upscale.sqlite3"
IMAGES_FOLDER = "images"

#: Seconds a stopping cluster process waits for its Redis connections to close.
CLOSE_TIMEOUT = 5.0

#: A readiness check: (passed, detail).
ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass(frozen=True)
class Backends:
    images: ImageStorage
    records: TaskRecords
    jobs: JobQueue
    sessions: SessionStore
    close: Callable[[], Awaitable[None]]
    #: This process's name in logs (the cluster's node or worker id; "local" for the single process).
    node: str = "local"
    cluster: bool = False
    #: What ``/ready`` checks besides the process itself (cluster: Redis and S3 reachable).
    ready_checks: Mapping[str, ReadyCheck] = field(default_factory=dict)
    #: Cluster-wide queue figures (blocking; None for the single process, whose queue is this process).
    queue_figures: Callable[[], QueueFigures] | None = None
    #: Tells the sessions how to read a finished task back as a frame (cluster sessions need it).
    bind_results: Callable[[FrameReader], None] = lambda _: None
    #: Seconds since the worker's last heartbeat in Redis (None: not a cluster worker, or none yet).
    heartbeat_age: Callable[[], float | None] = lambda: None
    #: Periodic work the backends need while the app runs: each runs until its ``stop`` event is set.
    background: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = ()


async def open_backends(settings: Settings, *, consume: bool) -> Backends:
    """The backends ``settings`` ask for: the cluster's when ``UPSCALE_REDIS_URL`` is set, else the
    single process's. ``consume``: this process runs jobs (a worker, or a single process)."""
    if settings.redis_url:
        return await open_cluster_backends(settings, consume=consume)
    return await asyncio.to_thread(open_local_backends, settings)


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

    async def close() -> None:
        db.close()

    sessions = LocalSessionStore(
        resume_seconds=settings.session_resume_seconds,
        buffer_bytes=settings.session_buffer_bytes,
        total_bytes=settings.session_buffers_total_bytes,
    )
    return Backends(
        images=images,
        records=records,
        jobs=LocalJobQueue(records, capacity=settings.max_queue),
        sessions=sessions,
        close=close,
        # Detached sessions expire even if no one reconnects.
        background=(lambda stop: sessions.expire_forever(stop=stop),),
    )


async def open_cluster_backends(settings: Settings, *, consume: bool) -> Backends:
    """The cluster backends: Redis and the S3 bucket, reached once here (503s later if they go away).

    A node restart marks nothing interrupted: an open task belongs to the queue or to a worker, and is
    re-run if its worker died.
    """
    from upscale_server.cluster import connect
    from upscale_server.cluster.connect import REDIS_FAILURES
    from upscale_server.cluster.images import S3ImageStore
    from upscale_server.cluster.jobs import RedisJobQueue, queue_stats
    from upscale_server.cluster.keys import Keys
    from upscale_server.cluster.objects import Bucket
    from upscale_server.cluster.records import RedisTaskRecords
    from upscale_server.cluster.sessions import RedisSessionStore
    from upscale_server.cluster.wakeups import Wakeups

    assert settings.redis_url is not None and settings.s3_bucket is not None
    node = connect.node_name(settings)
    keys = Keys(settings.redis_prefix)
    blocking = connect.open_redis(settings.redis_url)
    client = connect.open_async_redis(settings.redis_url)
    bucket = Bucket(await asyncio.to_thread(connect.open_s3, settings), settings.s3_bucket, settings.s3_prefix)
    images = S3ImageStore(
        blocking,
        keys,
        bucket,
        retention_seconds=settings.image_retention_days * 86400,
        presign_seconds=settings.s3_presign_seconds,
    )
    records = RedisTaskRecords(blocking, keys, node=node, result_ttl_seconds=settings.result_ttl_seconds)
    wakeups = Wakeups(client, keys.node(node), interval=settings.cluster_check_seconds)
    jobs = RedisJobQueue(
        client,
        keys,
        bucket,
        records,
        wakeups,
        node=node,
        capacity=settings.max_queue,
        slots=settings.worker_concurrency if consume else 0,
        dead_seconds=settings.worker_dead_seconds,
        max_deliveries=settings.worker_max_deliveries,
    )
    sessions = RedisSessionStore(client, keys, wakeups, node=node, resume_seconds=settings.session_resume_seconds)
    wakeups.start()

    async def close() -> None:
        await wakeups.aclose()
        await sessions.aclose(CLOSE_TIMEOUT)
        try:  # bounded, like every step of a shutdown
            await asyncio.wait_for(client.aclose(), CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("Redis connections not closed within %.0f s", CLOSE_TIMEOUT)
        except REDIS_FAILURES as exc:
            log.warning("Redis connections not closed cleanly (%s)", exc.__class__.__name__)
        blocking.close()

    async def redis_ready() -> tuple[bool, str]:
        try:
            await client.ping()
        except Exception as exc:
            return False, f"unreachable ({exc.__class__.__name__})"
        return True, "reachable" if wakeups.subscribed.is_set() else "reachable (wake-ups resubscribing)"

    async def s3_ready() -> tuple[bool, str]:
        try:
            await asyncio.to_thread(bucket.check)
        except Exception as exc:
            return False, f"unreachable ({exc.__class__.__name__})"
        return True, "reachable"

    def figures() -> QueueFigures:
        return queue_stats(blocking, keys, dead_seconds=settings.worker_dead_seconds)

    def heartbeat_age() -> float | None:
        consumer = jobs.consumer
        if consumer is None or not consumer.last_heartbeat:
            return None
        return time.monotonic() - consumer.last_heartbeat

    return Backends(
        images=images,
        records=records,
        jobs=jobs,
        sessions=sessions,
        close=close,
        node=node,
        cluster=True,
        ready_checks={"redis": redis_ready, "s3": s3_ready},
        queue_figures=figures,
        bind_results=sessions.bind,
        heartbeat_age=heartbeat_age,
    )


def check_cluster(settings: Settings) -> None:
    """Reach the cluster's Redis and bucket once, before a node or worker starts: UnusableSettingError
    with one line when either is unreachable, the bucket is missing or the credentials are refused."""
    from upscale_server.cluster.connect import check_cluster as check

    check(settings)


def interrupted_error(record: TaskRecord) -> JsonObject:
    """The error item a task gets when the process running it is gone."""
    item = error_item(TaskInterruptedError(), task_type=record.task_type, task_uuid=record.task_uuid)
    return with_status(item, "error")

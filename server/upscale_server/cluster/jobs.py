"""The cluster's job queue: a Redis Stream read by a consumer group of worker processes.

Accepting (any API node): the job goes into the stream by one script (:data:`.scripts.ENQUEUE`) that
checks the taskUUID, admits the job against the cluster-wide bound (the stream's length is waiting plus
running: finished entries are deleted) and writes the task record; only then is the task acknowledged.
A large job (an inline image) is put in S3 first and the stream carries its key.

Running (a worker, :class:`JobConsumer`): first take over entries whose worker stopped renewing them
for ``dead_seconds`` (``XAUTOCLAIM``), else read new ones (``XREADGROUP``), never more than the free
slots. While a job runs, its worker renews its claim every third of the dead threshold, so a long live
job is never taken away; a worker that was paused and comes back finds the result recorded by whoever
re-ran the job, and records nothing (:data:`.scripts.FINISH` lets only the first finisher record). A
job handed out more than ``max_deliveries`` times has crashed its workers: it fails with
``taskCrashedWorkers`` and is kept aside in the dead-letter stream instead of looping. Entries are
acknowledged and deleted only after the result is recorded.

Waiting (the accepting node): a sync request's future resolves on the ``done`` wake-up the finishing
worker publishes, or at the latest on the next periodic check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio

from upscale_server.cluster import scripts
from upscale_server.cluster.connect import REDIS_FAILURES, unavailable_on_failure
from upscale_server.cluster.keys import WORKERS_GROUP, Keys
from upscale_server.cluster.objects import Bucket
from upscale_server.cluster.wakeups import Wakeups
from upscale_server.errors import (
    ConflictTaskUUIDError,
    InternalError,
    QueueFullError,
    ServiceUnavailableError,
    error_item,
)
from upscale_server.observability.logs import task_context
from upscale_server.protocol import Outcome
from upscale_server.queue import Executor, QueueFigures, UpscaleJob
from upscale_server.storage import TaskRecords

log = logging.getLogger(__name__)

#: A job bigger than this (an inline image) travels through S3; the stream and the record keep its key.
INLINE_JOB_BYTES = 64 * 1024
#: Failures that leave a job pending for a later delivery (Redis unreachable, or S3 when loading the job).
RETRYABLE: tuple[type[BaseException], ...] = (*REDIS_FAILURES, ServiceUnavailableError)
#: Dead-letter entries kept (approximately).
DEAD_LETTERS_KEPT = 10_000
#: Milliseconds a worker's read blocks when nothing is queued: how soon it notices a stop, and (with a
#: quarter of the dead threshold when that is shorter) how soon an idle worker looks for abandoned jobs.
READ_BLOCK_MS = 1000


@dataclass(frozen=True)
class UnreadableJob:
    """A queued task whose job data is missing or broken (its S3 payload deleted, a corrupted hash)."""

    task_type: str
    reason: str


class RedisJobQueue:
    """:class:`~upscale_server.queue.JobQueue` on a Redis Stream. An API node only enqueues and waits;
    :meth:`start` (a worker) also consumes."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        bucket: Bucket,
        records: TaskRecords,
        wakeups: Wakeups,
        *,
        node: str,
        capacity: int,
        slots: int,
        dead_seconds: float,
        max_deliveries: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self.bucket = bucket
        self.records = records
        self.node = node
        self.capacity = capacity
        self.slots = slots
        self.dead_seconds = dead_seconds
        self.max_deliveries = max_deliveries
        self.clock = clock
        self._enqueue = client.register_script(scripts.ENQUEUE)
        self._waiters: dict[str, asyncio.Future[Outcome | None]] = {}
        self._consumer: JobConsumer | None = None
        wakeups.on("done", self._done)
        wakeups.every_interval(self._check_waiters)

    def start(self, execute: Executor, give_up: Executor) -> None:
        self._consumer = JobConsumer(self, execute, give_up)
        self._consumer.start()

    @property
    def consumer(self) -> JobConsumer | None:
        return self._consumer

    async def enqueue(self, job: UpscaleJob) -> asyncio.Future[Outcome | None]:
        task = job.task
        payload, ref = job.to_json(), ""
        if len(payload) > INLINE_JOB_BYTES:
            # Named for this acceptance, not the taskUUID: a duplicate that is refused as a conflict must
            # neither overwrite nor delete the payload of the task that has the UUID.
            ref = f"jobs/{task.task_uuid}-{job.output_uuid}.json"
            await asyncio.to_thread(self.bucket.put, ref, payload.encode(), "application/json")
            payload = ""
        future: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        if job.session is None:
            self._waiters[task.task_uuid] = future  # before the job exists: its wake-up cannot be missed
        try:
            with unavailable_on_failure("job queue (Redis)"):
                result = await self._enqueue(
                    keys=[self.keys.task(task.task_uuid), self.keys.jobs],
                    args=[
                        self.capacity,
                        task.task_type,
                        task.delivery_method,
                        self.clock(),
                        self.node,
                        job.session or "",
                        payload,
                        ref,
                        task.task_uuid,
                        job.owner,
                    ],
                )
        except BaseException:
            self._abandon(task.task_uuid, future, ref)
            raise
        if result in ("conflict", "full"):
            self._abandon(task.task_uuid, future, ref)
            if result == "conflict":
                raise ConflictTaskUUIDError.for_task(task.task_uuid)
            raise QueueFullError(
                f"{self.capacity} upscale tasks are already queued or running across the cluster "
                f"(UPSCALE_MAX_QUEUE={self.capacity}); retry shortly"
            )
        log.info("queued as %s", result)
        if job.session is not None:
            future.set_result(None)  # the result reaches the session through Redis, on whichever node
        return future

    def _abandon(self, task_uuid: str, future: asyncio.Future[Outcome | None], ref: str) -> None:
        if self._waiters.get(task_uuid) is future:
            del self._waiters[task_uuid]
        future.cancel()
        if ref:  # best effort: an orphan payload is only bytes in the bucket
            asyncio.get_running_loop().run_in_executor(None, _quietly, self.bucket.delete, ref)

    def _done(self, task_uuid: str) -> None:
        future = self._waiters.pop(task_uuid, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def _check_waiters(self) -> None:
        """Resolve every waiter whose task finished although no wake-up arrived."""
        waiting = list(self._waiters)
        if not waiting:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for task_uuid in waiting:
                pipe.hget(self.keys.task(task_uuid), "status")
            statuses = await pipe.execute()
        for task_uuid, status in zip(waiting, statuses, strict=True):
            # No record yet: its enqueue has not returned (the waiter is registered before it); not finished.
            if status is not None and status != "processing":
                log.info("task %s finished without a wake-up reaching this node", task_uuid)
                self._done(task_uuid)

    @property
    def in_flight(self) -> int:
        running = len(self._consumer.running) if self._consumer is not None else 0
        return len(self._waiters) + running

    async def drain(self, timeout: float) -> None:
        if self._consumer is not None:
            await self._consumer.stop(timeout)
        for future in self._waiters.values():
            future.cancel()  # the jobs go on in the workers; their results stay pollable
        self._waiters.clear()


class JobConsumer:
    """One worker process's side of the queue: claims jobs, keeps them while they run, records and acks."""

    def __init__(self, queue: RedisJobQueue, execute: Executor, give_up: Executor) -> None:
        self.queue = queue
        self.client = queue.client
        self.keys = queue.keys
        self.name = queue.node
        self.execute = execute
        self.give_up = give_up
        self.running: dict[str, asyncio.Task[None]] = {}
        self.last_heartbeat = 0.0
        self._renew = self.client.register_script(scripts.RENEW)
        self._free = asyncio.Event()
        self._free.set()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._reclaim_cursor = "0-0"

    @property
    def dead_ms(self) -> int:
        return int(self.queue.dead_seconds * 1000)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._consume()), asyncio.create_task(self._heartbeat())]

    async def stop(self, timeout: float) -> None:
        """Stop taking jobs, let the running ones finish for ``timeout`` s, hand the rest back at once."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self.running:
            log.info("waiting up to %.0f s for %d running job(s)", timeout, len(self.running))
            await asyncio.wait(set(self.running.values()), timeout=timeout)
        for entry_id, task in list(self.running.items()):
            with contextlib.suppress(*REDIS_FAILURES):
                await self._renew(
                    keys=[self.keys.jobs], args=[WORKERS_GROUP, self.name, entry_id, self.dead_ms]
                )  # idle as if dead: another worker takes it now, not after the threshold
            task.cancel()
        with contextlib.suppress(*REDIS_FAILURES):
            await self.client.zrem(self.keys.workers, self.name)

    # ------------------------------------------------------------------ the loop

    async def _consume(self) -> None:
        await self._create_group()
        while not self._stopping:
            await self._free.wait()
            free = self.queue.slots - len(self.running)
            try:
                entries = await self._reclaim(free) or await self._read(free)
            except REDIS_FAILURES as exc:
                log.warning("job queue unreachable (%s); retrying", exc.__class__.__name__)
                await asyncio.sleep(0.5)
                continue
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._create_group()  # Redis lost its data (no AOF?): start over with a new group
                continue
            for entry_id, fields in entries:
                self._start(entry_id, str(fields.get("task", "")))

    async def _create_group(self) -> None:
        while True:
            try:
                await self.client.xgroup_create(self.keys.jobs, WORKERS_GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            except REDIS_FAILURES as exc:
                log.warning("job queue unreachable (%s); retrying", exc.__class__.__name__)
                await asyncio.sleep(0.5)
                continue
            return

    async def _reclaim(self, count: int) -> list[tuple[str, dict[str, str]]]:
        """Entries whose worker stopped renewing them for the dead threshold."""
        reply = await self.client.xautoclaim(
            self.keys.jobs, WORKERS_GROUP, self.name, self.dead_ms, start_id=self._reclaim_cursor, count=count
        )
        self._reclaim_cursor = str(reply[0])
        entries = [(str(entry_id), fields) for entry_id, fields in reply[1] if fields is not None]
        for entry_id, _ in entries:
            log.warning("took over job %s from a worker that stopped renewing it", entry_id)
        return entries

    async def _read(self, count: int) -> list[tuple[str, dict[str, str]]]:
        block = max(1, min(READ_BLOCK_MS, self.dead_ms // 4))
        reply = await self.client.xreadgroup(WORKERS_GROUP, self.name, {self.keys.jobs: ">"}, count=count, block=block)
        streams = cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], reply or [])
        return [(str(entry_id), fields) for _, entries in streams for entry_id, fields in entries]

    def _start(self, entry_id: str, task_uuid: str) -> None:
        with task_context(task_uuid or None):
            task = asyncio.create_task(self._run(entry_id, task_uuid), name=f"job {task_uuid}")
        self.running[entry_id] = task
        if len(self.running) >= self.queue.slots:
            self._free.clear()
        task.add_done_callback(lambda _: self._finished(entry_id))

    def _finished(self, entry_id: str) -> None:
        self.running.pop(entry_id, None)
        self._free.set()

    # ------------------------------------------------------------------ one job

    async def _run(self, entry_id: str, task_uuid: str) -> None:
        renewing = asyncio.create_task(self._keep(entry_id))
        ref = ""
        try:
            job, ref, attempts = await self._load(task_uuid)
            if isinstance(job, UnreadableJob):
                await self._fail_unreadable(task_uuid, job)
            elif job is not None:
                if attempts > self.queue.max_deliveries:
                    await self._dead_letter(entry_id, job, attempts)
                else:
                    if attempts > 1:
                        log.warning("running again (delivery %d): its previous worker stopped", attempts)
                        await self.client.hincrby(self.keys.stats, "redeliveries", 1)
                    await self.execute(job)
            await self._ack(entry_id)
        except RETRYABLE as exc:  # the entry stays pending: a worker takes it again after the dead threshold
            log.warning("job %s left for a retry: Redis or S3 failed (%s)", entry_id, exc.__class__.__name__)
            return
        finally:
            renewing.cancel()
        if ref:
            await asyncio.to_thread(_quietly, self.queue.bucket.delete, ref)

    async def _load(self, task_uuid: str) -> tuple[UpscaleJob | UnreadableJob | None, str, int]:
        """The job of an open task, its S3 payload key, and this delivery's number (None when the task
        was finished already: a worker died between recording and acknowledging). A job whose data is
        gone or broken comes back as :class:`UnreadableJob`, to be failed, never retried forever."""
        key = self.keys.task(task_uuid)
        fields = ["status", "job", "job_ref", "type"]
        status, payload, ref, task_type = cast(list[str | None], await self.client.hmget(key, fields))
        if status != "processing":
            return None, "", 0
        try:
            if not payload and ref:
                payload = (await asyncio.to_thread(self.queue.bucket.get, ref)).decode()
            job: UpscaleJob | UnreadableJob = UpscaleJob.from_json(payload or "")
        except (FileNotFoundError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            job = UnreadableJob(task_type or "", f"{exc.__class__.__name__}: {exc}")
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "attempts", 1)
            pipe.hset(key, mapping={"worker": self.name, "started": self.queue.clock()})
            attempts = int((await pipe.execute())[0])
        return job, ref or "", attempts

    async def _fail_unreadable(self, task_uuid: str, job: UnreadableJob) -> None:
        log.error("the queued job cannot be read (%s): the task fails", job.reason)
        error = InternalError("the queued job could not be read back; send the task again with a new taskUUID")
        item = {**error_item(error, task_type=job.task_type or None, task_uuid=task_uuid), "status": "error"}
        await asyncio.to_thread(self.queue.records.fail, task_uuid, item)

    async def _dead_letter(self, entry_id: str, job: UpscaleJob, attempts: int) -> None:
        log.error("delivered %d times and its workers died each time: failed and set aside", attempts - 1)
        await self.client.xadd(
            self.keys.dead_letters,
            {"task": job.task.task_uuid, "entry": entry_id, "deliveries": attempts - 1, "worker": self.name},
            maxlen=DEAD_LETTERS_KEPT,
            approximate=True,
        )
        await self.client.hincrby(self.keys.stats, "dead_lettered", 1)
        await self.give_up(job)

    async def _ack(self, entry_id: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.jobs, WORKERS_GROUP, entry_id)
            pipe.xdel(self.keys.jobs, entry_id)
            await pipe.execute()

    async def _keep(self, entry_id: str) -> None:
        """Renew the claim every third of the dead threshold while the job runs."""
        interval = self.queue.dead_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                kept = await self._renew(keys=[self.keys.jobs], args=[WORKERS_GROUP, self.name, entry_id, 0])
            except REDIS_FAILURES as exc:
                log.warning("could not renew job %s (%s)", entry_id, exc.__class__.__name__)
                continue
            if not kept:
                log.warning("job %s was taken over by another worker; only the first result is recorded", entry_id)
                return

    async def _heartbeat(self) -> None:
        interval = self.queue.dead_seconds / 3
        while True:
            try:
                now = self.queue.clock()
                await self.client.zadd(self.keys.workers, {self.name: now})
                self.last_heartbeat = time.monotonic()
            except REDIS_FAILURES as exc:
                log.warning("heartbeat failed (%s)", exc.__class__.__name__)
            await asyncio.sleep(interval)


def queue_stats(client: redis.Redis, keys: Keys, *, dead_seconds: float, now: float | None = None) -> QueueFigures:
    """The cluster-wide queue figures for ``/metrics`` (blocking: called from the scrape thread)."""
    now = time.time() if now is None else now
    with client.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.jobs)
        pipe.xpending(keys.jobs, WORKERS_GROUP)
        pipe.xinfo_groups(keys.jobs)
        pipe.hgetall(keys.stats)
        pipe.zcount(keys.workers, now - dead_seconds, "+inf")
        replies: list[Any] = pipe.execute(raise_on_error=False)
    length = replies[0] if isinstance(replies[0], int) else 0
    pending = replies[1]["pending"] if isinstance(replies[1], dict) else 0
    groups = replies[2] if isinstance(replies[2], list) else []
    last_delivered = next((g["last-delivered-id"] for g in groups if g.get("name") == WORKERS_GROUP), "0-0")
    oldest = 0.0
    first = client.xrange(keys.jobs, min=f"({last_delivered}", max="+", count=1) if length > pending else []
    if first:
        oldest = max(0.0, now - int(str(first[0][0]).split("-")[0]) / 1000)
    counters = replies[3] if isinstance(replies[3], dict) else {}
    return QueueFigures(
        waiting=max(0, length - pending),
        running=pending,
        oldest_wait_seconds=oldest,
        redeliveries=int(counters.get("redeliveries", 0)),
        dead_lettered=int(counters.get("dead_lettered", 0)),
        workers_alive=int(replies[4]) if isinstance(replies[4], int) else 0,
    )


def _quietly(func: Callable[..., object], *args: object) -> None:
    try:
        func(*args)
    except Exception as exc:
        log.debug("ignored: %s", exc)

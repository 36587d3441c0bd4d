"""The task lifecycle, the dispatcher, the in-process job queue and authentication, each on its own.

Real SQLite task records in tmp_path; a recording webhook sender; no network, no inference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api_helpers import new_uuid
from upscale_server.api.auth import ApiKeys, owner_of
from upscale_server.errors import (
    ConflictTaskUUIDError,
    InvalidApiKeyError,
    MissingApiKeyError,
    QueueFullError,
    TaskNotFoundError,
)
from upscale_server.observability.metrics import Metrics
from upscale_server.protocol import GetResponseTask, Outcome, PingTask, UpscaleTask, parse_task
from upscale_server.queue import UpscaleJob
from upscale_server.queue.local import LocalJobQueue
from upscale_server.storage.sqlite import open_database
from upscale_server.storage.sqlite_records import SqliteTaskRecords
from upscale_server.tasks.dispatcher import RequestContext, TaskDispatcher
from upscale_server.tasks.lifecycle import TaskLifecycle
from upscale_server.tasks.ping import handle_ping
from upscale_server.tasks.results import RecordedResults
from upscale_server.tasks.upscale import UpscaleHandler

BASE = "http://testserver"


class RecordingWebhooks:
    """Stands in for the webhook sender: remembers what would have been POSTed where."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], str]] = []

    def send(self, url: str, payload: dict[str, Any], *, task_uuid: str) -> None:
        self.sent.append((url, payload, task_uuid))


@pytest.fixture
def records(tmp_path: Path) -> Iterator[SqliteTaskRecords]:
    db = open_database(tmp_path / "tasks.sqlite3")
    yield SqliteTaskRecords(db, result_ttl_seconds=3600)
    db.close()


@pytest.fixture
def webhooks() -> RecordingWebhooks:
    return RecordingWebhooks()


@pytest.fixture
def jobs(records: SqliteTaskRecords) -> LocalJobQueue:
    return LocalJobQueue(records, capacity=2)


@pytest.fixture
def lifecycle(records: SqliteTaskRecords, webhooks: RecordingWebhooks) -> TaskLifecycle:
    return TaskLifecycle(records, webhooks, Metrics(process_metrics=False))  # type: ignore[arg-type]


def upscale_job(task_uuid: str | None = None, delivery: str = "async") -> UpscaleJob:
    raw = {"taskType": "upscale", "taskUUID": task_uuid or new_uuid(), "inputImage": "https://h/x.png"}
    task = parse_task({**raw, "deliveryMethod": delivery})
    assert isinstance(task, UpscaleTask)
    return UpscaleJob(task, BASE)


# --------------------------------------------------------------------------- admission and claim


def test_admission_refuses_before_claiming_and_a_conflict_gives_its_place_back(
    lifecycle: TaskLifecycle, records: SqliteTaskRecords, jobs: LocalJobQueue
) -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def execute(job: UpscaleJob) -> Outcome:
            await release.wait()
            return Outcome(item={"taskUUID": job.task.task_uuid})

        jobs.start(execute, execute)
        first, second, third = upscale_job(), upscale_job(), upscale_job()
        done = [await jobs.enqueue(first), await jobs.enqueue(second)]
        assert jobs.in_flight == 2
        with pytest.raises(QueueFullError) as full:
            await jobs.enqueue(third)
        assert full.value.http_status == 429 and "UPSCALE_MAX_QUEUE=2" in full.value.message
        assert records.get(third.task.task_uuid) is None  # refused before the claim: the UUID can be sent again
        await lifecycle.accept("imageUpload", new_uuid(), "sync")  # uploads are not admitted
        release.set()
        await asyncio.wait(done)
        assert jobs.in_flight == 0
        with pytest.raises(ConflictTaskUUIDError) as conflict:
            await jobs.enqueue(upscale_job(second.task.task_uuid, "sync"))
        assert conflict.value.parameter == "taskUUID"
        assert jobs.in_flight == 0  # the conflict gave its place back
        await (await jobs.enqueue(third))
        assert jobs.in_flight == 0

    asyncio.run(scenario())


def test_a_job_frees_its_place_whatever_becomes_of_it(
    lifecycle: TaskLifecycle, records: SqliteTaskRecords, jobs: LocalJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when its outcome cannot be recorded (a full disk, say): the queue must not fill up for good."""

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("database or disk is full")

    monkeypatch.setattr(records, "complete", broken)
    monkeypatch.setattr(records, "fail", broken)

    async def execute(job: UpscaleJob) -> Outcome:
        work = _item({"taskUUID": job.task.task_uuid})
        return await lifecycle.execute(job.task.task_type, job.task.task_uuid, BASE, work, webhook_url=None)

    async def scenario() -> None:
        jobs.start(execute, execute)
        for _ in range(3):  # more jobs, one after another, than the queue has places
            await (await jobs.enqueue(upscale_job(delivery="sync")))
            assert jobs.in_flight == 0

    asyncio.run(scenario())


async def _item(item: dict[str, Any]) -> dict[str, Any]:
    return item


async def _fails(exc: Exception) -> dict[str, Any]:
    raise exc


# --------------------------------------------------------------------------- run, record, notify


def test_a_result_is_recorded_in_its_stored_shape_and_sent_to_the_webhook(
    lifecycle: TaskLifecycle, records: SqliteTaskRecords, webhooks: RecordingWebhooks
) -> None:
    task_uuid = new_uuid()
    item = {"taskType": "upscale", "taskUUID": task_uuid, "imageUUID": "i", "imageURL": f"{BASE}/image/i.png"}

    async def scenario() -> Outcome:
        await lifecycle.accept("upscale", task_uuid, "async")
        return await lifecycle.execute("upscale", task_uuid, BASE, _item(item), webhook_url="https://hook/x")

    outcome = asyncio.run(scenario())
    assert outcome == Outcome(item=item)
    record = records.get(task_uuid)
    assert record is not None and record.status == "success"
    assert record.item == {**item, "imageURL": "/image/i.png", "status": "success"}  # paths, not this address
    assert webhooks.sent == [("https://hook/x", {"data": [item]}, task_uuid)]


def test_a_failure_is_recorded_as_its_error_item_and_sent_to_the_webhook(
    lifecycle: TaskLifecycle, records: SqliteTaskRecords, webhooks: RecordingWebhooks
) -> None:
    task_uuid = new_uuid()

    async def scenario() -> Outcome:
        await lifecycle.accept("upscale", task_uuid, "sync")
        work = _fails(TaskNotFoundError("gone", parameter="taskUUID"))
        return await lifecycle.execute("upscale", task_uuid, BASE, work, webhook_url="https://hook/x")

    outcome = asyncio.run(scenario())
    assert outcome.status == 404 and outcome.item is None
    expected = {"code": "taskNotFound", "message": "gone", "parameter": "taskUUID", "taskType": "upscale"}
    assert outcome.error == {**expected, "taskUUID": task_uuid}
    record = records.get(task_uuid)
    recorded = {**expected, "taskUUID": task_uuid, "status": "error", "_httpStatus": 404}  # the sync reply's status
    assert record is not None and record.error == recorded
    assert webhooks.sent == [("https://hook/x", {"errors": [outcome.error]}, task_uuid)]


def test_only_the_run_that_records_the_outcome_notifies(
    lifecycle: TaskLifecycle, records: SqliteTaskRecords, webhooks: RecordingWebhooks
) -> None:
    """A second run of one task (a cluster re-run after a worker stopped) changes nothing and sends nothing."""
    task_uuid = new_uuid()

    async def scenario() -> None:
        await lifecycle.accept("upscale", task_uuid, "async")
        await lifecycle.execute("upscale", task_uuid, BASE, _item({"imageUUID": "first"}), webhook_url="https://h/1")
        await lifecycle.execute("upscale", task_uuid, BASE, _item({"imageUUID": "second"}), webhook_url="https://h/1")

    asyncio.run(scenario())
    record = records.get(task_uuid)
    assert record is not None and record.item is not None and record.item["imageUUID"] == "first"
    assert [payload["data"][0]["imageUUID"] for _, payload, _ in webhooks.sent] == ["first"]


def test_an_unexpected_exception_becomes_a_generic_error_never_its_text(
    lifecycle: TaskLifecycle, records: SqliteTaskRecords
) -> None:
    task_uuid = new_uuid()

    async def scenario() -> Outcome:
        await lifecycle.accept("imageUpload", task_uuid, "sync")
        work = _fails(RuntimeError("/secret/path exploded"))
        return await lifecycle.execute("imageUpload", task_uuid, BASE, work, webhook_url=None)

    outcome = asyncio.run(scenario())
    assert outcome.status == 500 and outcome.error is not None
    assert outcome.error["code"] == "internalServerError" and "/secret" not in str(outcome.error)
    record = records.get(task_uuid)
    assert record is not None and record.status == "error"


# --------------------------------------------------------------------------- the dispatcher


def test_the_dispatcher_routes_by_task_type_and_answers_every_task_once() -> None:
    seen: list[Any] = []

    async def poll_handler(task: GetResponseTask, request: RequestContext, emit: Any) -> None:
        seen.append((task, request))
        raise TaskNotFoundError("no such task", parameter="taskUUID")

    dispatcher = TaskDispatcher({PingTask: handle_ping, GetResponseTask: poll_handler}, Metrics(process_metrics=False))
    outcomes: list[Outcome] = []

    async def emit(outcome: Outcome) -> None:
        outcomes.append(outcome)

    task_uuid = new_uuid()
    raw = [
        {"taskType": "authentication", "apiKey": "k"},  # not leading here: ignored, never answered
        {"taskType": "ping", "ping": True},
        {"taskType": "getResponse", "taskUUID": task_uuid},
        {"taskType": "nope", "taskUUID": task_uuid},
    ]
    asyncio.run(dispatcher.dispatch(raw, base_url=BASE, emit=emit))
    assert seen == [(GetResponseTask(task_uuid=task_uuid), RequestContext(BASE))]
    assert Outcome(item={"taskType": "ping", "pong": True}) in outcomes
    codes = sorted(str(o.error["code"]) for o in outcomes if o.error is not None)
    assert codes == ["invalidTaskType", "taskNotFound"]
    assert len(outcomes) == 3


# --------------------------------------------------------------------------- the in-process job queue


def test_the_local_queue_runs_jobs_concurrently_and_drains_them(records: SqliteTaskRecords) -> None:
    async def scenario() -> None:
        queue = LocalJobQueue(records, capacity=3)
        with pytest.raises(RuntimeError, match="not started"):
            await queue.enqueue(upscale_job())
        release = asyncio.Event()
        started: list[UpscaleJob] = []

        async def execute(job: UpscaleJob) -> Outcome:
            started.append(job)
            await release.wait()
            return Outcome(item={"taskUUID": job.task.task_uuid})

        queue.start(execute, execute)
        jobs = [upscale_job() for _ in range(3)]
        futures = [await queue.enqueue(job) for job in jobs]
        with pytest.raises(QueueFullError):
            await queue.enqueue(upscale_job())
        await asyncio.sleep(0)
        assert len(started) == 3 and queue.in_flight == 3  # none waits for another
        release.set()
        await queue.drain(timeout=10)
        assert queue.in_flight == 0
        assert [f.result() for f in futures] == [Outcome(item={"taskUUID": job.task.task_uuid}) for job in jobs]

    asyncio.run(scenario())


def test_a_job_travels_as_json_with_the_image_uuids_chosen_at_acceptance() -> None:
    job = upscale_job(delivery="sync")
    again = UpscaleJob.from_json(job.to_json())
    assert again == job and again.output_uuid != again.input_uuid


# --------------------------------------------------------------------------- authentication


def test_rest_takes_the_leading_tasks_string_key_else_the_header() -> None:
    keys = ApiKeys(["good"])
    ping: dict[str, Any] = {"taskType": "ping"}
    good = (owner_of("good"), [ping])
    assert keys.authenticate_request([{"taskType": "authentication", "apiKey": "good"}, ping], bearer=None) == good
    assert keys.authenticate_request([ping], bearer="good") == good
    assert keys.authenticate_request([{"taskType": "authentication", "apiKey": 7}, ping], bearer="good") == good
    with pytest.raises(MissingApiKeyError, match="Authorization: Bearer"):  # a string key, even empty, is the key
        keys.authenticate_request([{"taskType": "authentication", "apiKey": ""}, ping], bearer="good")
    with pytest.raises(InvalidApiKeyError):
        keys.authenticate_request([{"taskType": "authentication", "apiKey": "  "}], bearer="good")
    with pytest.raises(MissingApiKeyError):
        keys.authenticate_request([{"taskType": "authentication", "apiKey": 7}], bearer=None)
    with pytest.raises(MissingApiKeyError):
        keys.authenticate_request([ping], bearer=None)
    open_mode = ApiKeys([])
    for leading in ({"taskType": "authentication"}, {"taskType": "authentication", "apiKey": ""}):
        assert open_mode.authenticate_request([leading, ping], bearer=None) == ("", [ping])  # one tenant


def test_websocket_frames_must_carry_their_key() -> None:
    keys = ApiKeys(["good"])
    ping: dict[str, Any] = {"taskType": "ping"}
    owner, auth, rest = keys.authenticate_frame([{"taskType": "authentication", "apiKey": "good"}, ping])
    assert owner == owner_of("good") and auth.api_key == "good" and rest == [ping]
    with pytest.raises(InvalidApiKeyError):
        keys.authenticate_frame([{"taskType": "authentication", "apiKey": 7}])
    with pytest.raises(MissingApiKeyError):
        keys.authenticate_frame([{"taskType": "authentication", "apiKey": " "}])
    with pytest.raises(MissingApiKeyError):  # even in open mode: there is no header to stand in
        ApiKeys([]).authenticate_frame([{"taskType": "authentication"}])


def test_an_owner_is_a_hash_that_tells_keys_apart_and_holds_no_key() -> None:
    owners = {owner_of(key) for key in ("good", "good ", "other", "\ud800")}
    assert len(owners) == 4 and all(len(owner) == 32 and "good" not in owner for owner in owners)


def test_a_sync_client_that_hangs_up_does_not_cancel_its_accepted_task(
    records: SqliteTaskRecords, jobs: LocalJobQueue
) -> None:
    """The reply is shielded from the request: nothing accepted is lost when the caller goes away."""
    task = upscale_job(delivery="sync").task

    async def scenario() -> None:
        queue = jobs
        release = asyncio.Event()
        running = asyncio.Event()

        async def execute(job: UpscaleJob) -> Outcome:
            running.set()
            await release.wait()
            return Outcome(item={"taskUUID": job.task.task_uuid})

        queue.start(execute, execute)
        handler = UpscaleHandler(
            queue,
            RecordedResults(records, images=None),  # type: ignore[arg-type]
            outbound=None,  # type: ignore[arg-type]
            checks=None,  # type: ignore[arg-type]  # a sync task checks nothing before it is queued ...
            admit_in_process=False,  # ... but its memory, which this test leaves out
        )
        emitted: list[Outcome] = []

        async def emit(outcome: Outcome) -> None:
            emitted.append(outcome)

        request = asyncio.create_task(handler(task, RequestContext(BASE), emit))
        await running.wait()
        request.cancel()  # the client hung up
        with pytest.raises(asyncio.CancelledError):
            await request
        assert queue.in_flight == 1  # the job runs on
        release.set()
        await queue.drain(timeout=10)
        assert queue.in_flight == 0 and emitted == []

    asyncio.run(scenario())

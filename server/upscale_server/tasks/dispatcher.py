"""The task dispatcher: one place that runs Runware tasks for both transports.

REST and WebSocket differ only in how outcomes travel (one HTTP reply vs. one frame each), so
they hand the parsed task array and an ``emit`` callback here. Every task of an array runs
concurrently and fails on its own. Inference runs on the worker; decoding and encoding (with the
storing of what they produce) in the codec pool, so the device never waits for a PNG and the worker
never encodes; SQLite and file reads in ``asyncio.to_thread``. The event loop stays free for pings.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from upscale_server.config import Settings
from upscale_server.delivery import WebhookSender, upload_output
from upscale_server.errors import (
    ConflictTaskUUIDError,
    QueueFullError,
    TaskNotFoundError,
    UploadFailedError,
    error_item,
    http_status_of,
)
from upscale_server.imaging import Picture
from upscale_server.inference.service import InferenceService
from upscale_server.observability.logs import task_context
from upscale_server.observability.metrics import Metrics
from upscale_server.outbound import OutboundClient
from upscale_server.protocol import (
    AuthenticationTask,
    GetResponseTask,
    ImageUploadTask,
    PingTask,
    UpscaleTask,
    ack_item,
    envelope,
    parse_task,
    pong_item,
    processing_item,
    task_identity,
    upload_item,
    upscale_item,
    with_status,
)
from upscale_server.storage.images import ImageStore
from upscale_server.storage.results import TaskStore
from upscale_server.tasks.inputs import Base64Ref, DataUriRef, UrlRef, UuidRef, classify_image_input
from upscale_server.tasks.media import (
    StoredOutput,
    compact_result,
    decode_input,
    expand_result,
    load_stored,
    output_fields,
    store_input,
    store_output,
    store_upload,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """What one task produced: a data item, or an error item with the HTTP status it maps to."""

    item: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    status: int = 200


Emit = Callable[[Outcome], Awaitable[None]]


def failure(exc: BaseException, task_type: str | None, task_uuid: str | None) -> Outcome:
    """The outcome of a failed task; unexpected exceptions are logged (with traceback) by error_item."""
    return Outcome(error=error_item(exc, task_type=task_type, task_uuid=task_uuid), status=http_status_of(exc))


class TaskDispatcher:
    def __init__(
        self,
        *,
        settings: Settings,
        images: ImageStore,
        results: TaskStore,
        inference: InferenceService,
        outbound: OutboundClient,
        webhooks: WebhookSender,
        metrics: Metrics | None = None,
        codecs: Executor | None = None,
    ) -> None:
        """``codecs``: the pool that decodes and encodes (the app owns it and sizes it from
        ``encode_workers``); None uses the event loop's default executor."""
        self.settings = settings
        self.images = images
        self.results = results
        self.inference = inference
        self.outbound = outbound
        self.webhooks = webhooks
        self.metrics = metrics if metrics is not None else Metrics(process_metrics=False)
        self.codecs = codecs
        self._background: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # upscale tasks accepted and not finished; only touched on the event loop

    async def dispatch(self, raw_tasks: Sequence[object], *, base_url: str, emit: Emit) -> None:
        """Run every task of an array concurrently; each emits exactly one outcome (auth: none)."""
        await asyncio.gather(*(self._run_one(raw, base_url, emit) for raw in raw_tasks))

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for async tasks still running, at shutdown."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)

    async def _run_one(self, raw: object, base_url: str, emit: Emit) -> None:
        task_type, task_uuid = task_identity(raw)
        with task_context(task_uuid):  # every log line of this task, and of what it spawns, carries its UUID
            await self._run_in_context(raw, task_type, task_uuid, base_url, emit)

    async def _run_in_context(
        self, raw: object, task_type: str | None, task_uuid: str | None, base_url: str, emit: Emit
    ) -> None:
        try:
            task = parse_task(raw)
            if isinstance(task, AuthenticationTask):
                return  # the transport authenticated the request already
            if isinstance(task, PingTask):
                await emit(Outcome(item=pong_item()))
            elif isinstance(task, GetResponseTask):
                await emit(await self._get_response(task, base_url))
            elif isinstance(task, ImageUploadTask):
                await self._claim(task.task_uuid, "imageUpload", "sync")
                await emit(await self._tracked(task.task_uuid, "imageUpload", base_url, self._upload(task, base_url)))
            elif isinstance(task, UpscaleTask):
                await self._check_destinations(task)  # a refused webhook or endpoint does not use up the UUID
                self._admit()
                try:
                    await self._claim(task.task_uuid, task.task_type, task.delivery_method)
                except BaseException:
                    self._in_flight -= 1
                    raise
                tracked = self._tracked(
                    task.task_uuid, task.task_type, base_url, self._admitted(self._upscale(task, base_url))
                )
                work = self._notify(task, tracked)
                if task.delivery_method == "async":
                    await emit(Outcome(item=ack_item(task.task_type, task.task_uuid)))
                    self._spawn(work)
                else:
                    await emit(await work)
        except Exception as exc:
            outcome = failure(exc, task_type, task_uuid)
            assert outcome.error is not None
            self.metrics.task_finished(task_type or "unknown", str(outcome.error["code"]))
            await emit(outcome)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _admit(self) -> None:
        """Admission control: refuse an upscale up front (429) rather than after acknowledging it."""
        if self._in_flight >= self.settings.max_queue:
            raise QueueFullError(
                f"{self._in_flight} upscale tasks are already queued or running "
                f"(UPSCALE_MAX_QUEUE={self.settings.max_queue}); retry shortly"
            )
        self._in_flight += 1

    async def _admitted(self, work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        try:
            return await work
        finally:
            self._in_flight -= 1

    async def _check_destinations(self, task: UpscaleTask) -> None:
        if task.webhook_url:
            await self.outbound.check_url(task.webhook_url, parameter="webhookURL")
        if task.upload_endpoint:
            await self.outbound.check_url(task.upload_endpoint, parameter="uploadEndpoint")

    async def _notify(self, task: UpscaleTask, work: Awaitable[Outcome]) -> Outcome:
        """Run the task, then POST its result (or its error) to ``webhookURL`` in the background."""
        outcome = await work
        if task.webhook_url:
            if outcome.item is not None:
                payload = envelope(data=[outcome.item])
            else:
                assert outcome.error is not None
                payload = envelope(errors=[outcome.error])
            self.webhooks.send(task.webhook_url, payload, task_uuid=task.task_uuid)
        return outcome

    def _spawn(self, work: Awaitable[Outcome]) -> None:
        async def run() -> None:
            await work

        background = asyncio.create_task(run())
        self._background.add(background)
        background.add_done_callback(self._background.discard)

    async def _claim(self, task_uuid: str, task_type: str, delivery: str) -> None:
        if not await asyncio.to_thread(self.results.claim, task_uuid, task_type, delivery):
            raise ConflictTaskUUIDError(
                f"taskUUID {task_uuid} was already used; send each task with a new UUID "
                "(getResponse returns the earlier task's result)",
                parameter="taskUUID",
            )

    async def _tracked(self, task_uuid: str, task_type: str, base_url: str, work: Awaitable[dict[str, Any]]) -> Outcome:
        """Run claimed work and record its result or error, so getResponse can answer later."""
        try:
            item = await work
        except Exception as exc:
            outcome = failure(exc, task_type, task_uuid)
            assert outcome.error is not None
            self.metrics.task_finished(task_type, str(outcome.error["code"]))
            await asyncio.to_thread(self.results.fail, task_uuid, {**outcome.error, "status": "error"})
            return outcome
        self.metrics.task_finished(task_type, "success")
        try:
            await asyncio.to_thread(
                self.results.complete, task_uuid, compact_result(with_status(item, "success"), base_url)
            )
        except Exception as exc:  # the result exists but could not be recorded: say so to pollers
            outcome = failure(exc, task_type, task_uuid)
            assert outcome.error is not None
            await asyncio.to_thread(self.results.fail, task_uuid, {**outcome.error, "status": "error"})
        return Outcome(item=item)

    async def _get_response(self, task: GetResponseTask, base_url: str) -> Outcome:
        record = await asyncio.to_thread(self.results.get, task.task_uuid)
        if record is None:
            raise TaskNotFoundError(
                f"no task with taskUUID {task.task_uuid} (never sent, or its result expired)",
                parameter="taskUUID",
            )
        if record.status == "processing":
            return Outcome(item=processing_item(record.task_type, record.task_uuid))
        if record.status == "success":
            assert record.item is not None
            return Outcome(item=await asyncio.to_thread(expand_result, self.images, record.item, base_url))
        assert record.error is not None
        return Outcome(error=record.error, status=200)

    # ----------------------------------------------------------------------------------- tasks

    async def _input_bytes(self, value: str, parameter: str) -> tuple[bytes, str | None]:
        """The raw bytes of an image input, and its stored UUID when it names one."""
        ref = classify_image_input(value, parameter=parameter)
        if isinstance(ref, UuidRef):
            data, stored = await asyncio.to_thread(load_stored, self.images, ref.uuid, parameter=parameter)
            return data, stored.uuid
        if isinstance(ref, UrlRef):
            data = await self.outbound.get_bytes(ref.url, max_bytes=self.settings.max_fetch_bytes, parameter=parameter)
            return data, None
        assert isinstance(ref, DataUriRef | Base64Ref)
        return ref.data, None

    async def _in_codecs(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``func(*args, **kwargs)`` in the codec pool, in the caller's context (its taskUUID reaches the
        log lines), as ``asyncio.to_thread`` does for the default executor."""
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.codecs, call)

    async def _upload(self, task: ImageUploadTask, base_url: str) -> dict[str, Any]:
        data, _ = await self._input_bytes(task.image, "image")
        picture = await self._in_codecs(
            decode_input, data, max_pixels=self.settings.max_input_pixels, parameter="image"
        )
        stored = await self._in_codecs(
            store_upload, self.images, picture, max_side=self.settings.upload_max_side, executor=self.codecs
        )
        return upload_item(task.task_uuid, stored.uuid, image_url(base_url, stored.uuid, stored.extension))

    async def _upscale(self, task: UpscaleTask, base_url: str) -> dict[str, Any]:
        self.inference.check_model(task.model)  # an unknown model fails before any I/O
        data, input_uuid = await self._input_bytes(task.image, task.image_parameter)
        picture = await self._in_codecs(
            decode_input, data, max_pixels=self.settings.max_input_pixels, parameter=task.image_parameter
        )
        plan = await asyncio.to_thread(
            self.inference.plan, picture.width, picture.height, task.upscale_factor, task.model
        )
        inferring = asyncio.ensure_future(self.inference.run(picture, plan, label=task.task_uuid))
        # An inline input is stored while the network runs: only the reply needs its UUID.
        storing = None
        if input_uuid is None:
            storing = asyncio.ensure_future(self._in_codecs(store_input, self.images, data, picture))
        try:
            result = await inferring
            output, url, fields = await self._in_codecs(self._store_result, result, task, base_url)
        except BaseException:
            if storing is not None:  # the task failed: its input's UUID is never reported
                storing.cancel()
                storing.add_done_callback(_outcome_ignored)
            raise
        if storing is not None:
            input_uuid = (await storing).uuid
        if task.upload_endpoint:
            try:
                await upload_output(self.outbound, task.upload_endpoint, output.data, output.image.content_type)
            except UploadFailedError as exc:
                exc.message += f"; the result is kept as imageUUID {output.image.uuid} at {url}"
                raise
        cost = self.cost(*plan.output_size) if task.include_cost else None
        return upscale_item(
            task.task_type,
            task.task_uuid,
            output.image.uuid,
            input_uuid,
            fields,
            cost,
        )

    def _store_result(
        self, result: Picture, task: UpscaleTask, base_url: str
    ) -> tuple[StoredOutput, str, dict[str, str]]:
        """Encode once, store, and build the reply field from the same bytes (in the codec pool: the
        base64 of a big output is work too). Returns the output, its URL and the reply field."""
        output = store_output(
            self.images,
            result,
            output_format=task.output_format,
            quality=task.output_quality,
            ttl_seconds=task.ttl if task.output_type == "URL" else None,
            executor=self.codecs,  # a big PNG is deflated in stripes on the pool's idle threads
        )
        url = image_url(base_url, output.image.uuid, output.image.extension)
        return output, url, output_fields(output, task.output_type, url)

    def cost(self, width: int, height: int) -> float:
        return round(self.settings.cost_per_megapixel * width * height / 1e6, 6) + 0.0


def _outcome_ignored(task: asyncio.Future[Any]) -> None:
    """Mark a background step's error as seen: the task failed for another reason already."""
    if not task.cancelled():
        task.exception()


def image_url(base_url: str, image_uuid: str, extension: str) -> str:
    return f"{base_url.rstrip('/')}/image/{image_uuid}.{extension}"

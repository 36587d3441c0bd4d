"""``imageUpscale`` and ``upscale``: accepted here, queued as a job, run by :class:`UpscaleRunner`.

The two halves meet only through the job queue, which may hand the job to another process (a cluster
worker). :class:`UpscaleHandler` checks the destinations, enqueues an
:class:`~upscale_server.queue.UpscaleJob` (admitted and claimed in the same step), then replies with the
outcome (sync) or acknowledges at once (async). :class:`UpscaleRunner` is what runs a job: fetch
and decode the input, plan, run the network on the inference worker, encode and store the output,
upload it when asked, and record the result through the lifecycle.

:class:`UpscaleChecks` holds what a run checks before the network runs (model, factor, input, size
plan, price); a dry run (``X-Runware-Dry-Run: 1``, ``?dryRun=1``) goes through exactly those checks
and answers without claiming the UUID, queueing, storing, uploading or notifying anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from upscale_server.budget import Reservation, pixel_cost
from upscale_server.delivery import upload_output
from upscale_server.errors import (
    ConflictTaskUUIDError,
    ImageTooLargeError,
    InvalidImageError,
    TaskCrashedWorkersError,
    UploadFailedError,
    UpscaleError,
)
from upscale_server.imaging import Picture
from upscale_server.inference import InferenceService, UpscalePlan
from upscale_server.outbound import OutboundClient
from upscale_server.protocol import (
    Outcome,
    UpscaleTask,
    WireItem,
    ack_item,
    dry_run_item,
    image_output,
    upscale_item,
)
from upscale_server.queue import JobQueue, UpscaleJob
from upscale_server.tasks.dispatcher import Emit, RequestContext
from upscale_server.tasks.images import StoredOutput, TaskImages, store_output
from upscale_server.tasks.lifecycle import TaskLifecycle
from upscale_server.tasks.results import RecordedResults, base64_text, data_uri, image_url


class UpscaleChecks:
    """What a run checks before the network runs, in the order it runs them; dry runs stop after them."""

    def __init__(self, inference: InferenceService, images: TaskImages, *, cost_per_megapixel: float) -> None:
        self.inference = inference
        self.images = images
        self.cost_per_megapixel = cost_per_megapixel

    def check_model(self, task: UpscaleTask) -> None:
        """The model exists and serves the factor (up to its native scale; ``upscale`` also follows the
        model's schema); a restoration model is refused. No image I/O."""
        if task.upscale_factor is None:  # targetMegapixels: checked against the picture later
            self.inference.upscale_factors(task.model)
            return
        self.inference.check_factor(task.model, task.upscale_factor, schema=task.task_type == "upscale")

    async def plan(self, task: UpscaleTask, picture: Picture) -> UpscalePlan:
        """The plan for ``picture``: by factor, or by ``targetMegapixels`` (refused when out of reach)."""
        return await self._plan(task, picture.width, picture.height)

    async def _plan(self, task: UpscaleTask, width: int, height: int) -> UpscalePlan:
        if task.target_megapixels is not None:
            return await asyncio.to_thread(
                self.inference.plan_target, width, height, task.target_megapixels, task.model
            )
        assert task.upscale_factor is not None  # the parser sets exactly one of the two
        return await asyncio.to_thread(self.inference.plan, width, height, task.upscale_factor, task.model)

    async def memory_cost(self, task: UpscaleTask, data: bytes) -> tuple[int, str]:
        """What running ``task`` on ``data`` holds at its peak (see :func:`~upscale_server.budget.pixel_cost`),
        from the image's header and the output size planned for it, and how to name it in a refusal.
        Raises what decoding would raise for an unreadable or oversized header; a plan that fails counts
        the input alone (the run fails on the same plan before any output exists)."""
        header = await self.images.header(data, task.image_parameter)
        try:
            outputs = self.inference.canvas_sizes(await self._plan(task, header.width, header.height))
        except UpscaleError:
            outputs = ()
        cost = pixel_cost(header, encoded_bytes=len(data), outputs=outputs)
        return cost, f"this task's {header.width}x{header.height} input"

    async def admit(self, task: UpscaleTask, key: str) -> Reservation | None:
        """Reserve the task's memory before it is accepted, when its input is inline or stored (a URL is
        downloaded only when the task runs, which then waits for room): QueueFullError (429) when the
        budget cannot take it now. None when there is nothing to reserve yet, or the header is unreadable
        (the run reports that, as it reports an image that does not decode)."""
        data = await self.images.held_bytes(task.image, task.image_parameter)
        if data is None:
            return None
        try:
            cost, what = await self.memory_cost(task, data)
        except (InvalidImageError, ImageTooLargeError):
            return None
        return self.images.budget.reserve(cost, what=what, parameter=task.image_parameter, key=key)

    def cost(self, width: int, height: int) -> float:
        return round(self.cost_per_megapixel * width * height / 1e6, 6) + 0.0

    async def rehearse(self, task: UpscaleTask) -> WireItem:
        """A dry run: every check of a real run up to the network (the input is fetched and decoded, as a
        run would, so a missing or undecodable image fails here too); nothing is stored or sent."""
        self.check_model(task)
        data, _ = await self.images.input_bytes(task.image, task.image_parameter)
        memory, what = await self.memory_cost(task, data)
        with self.images.budget.reserve(memory, what=what, parameter=task.image_parameter):
            picture = await self.images.decode(data, task.image_parameter)
            plan = await self.plan(task, picture)
            del picture
        return dry_run_item(task.task_type, task.task_uuid, self.cost(*plan.output_size) if task.include_cost else None)


class UpscaleHandler:
    """The accepting half: nothing is acknowledged before the task is admitted and claimed."""

    def __init__(
        self,
        jobs: JobQueue,
        results: RecordedResults,
        outbound: OutboundClient,
        checks: UpscaleChecks,
        *,
        admit_in_process: bool = True,
    ) -> None:
        self.jobs = jobs
        self.results = results
        self.outbound = outbound
        self.checks = checks
        # Memory is reserved at admission only where the job will run: this process's queue. A cluster's
        # jobs run on workers, each of which holds its own budget (it waits for room before decoding).
        self.admit_in_process = admit_in_process

    async def __call__(self, task: UpscaleTask, request: RequestContext, emit: Emit) -> None:
        if task.delivery_method == "async":
            # What can fail without the image is answered now, as a sync task would answer it; only
            # the download, decoding and inference report through getResponse or the webhook.
            self.checks.check_model(task)
            await self.checks.images.check_input(task.image, task.image_parameter)
        # A refused webhook or upload endpoint is refused before the UUID is used up.
        if task.webhook_url:
            await self.outbound.check_url(task.webhook_url, parameter="webhookURL")
        if task.upload_endpoint:
            await self.outbound.check_url(task.upload_endpoint, parameter="uploadEndpoint")
        if request.dry_run:
            await emit(Outcome(item=await self._rehearse(task)))
            return
        job = UpscaleJob(task, request.base_url, request.session, owner=request.owner)
        admitted = await self.checks.admit(task, job.output_uuid) if self.admit_in_process else None
        try:
            done = await self.jobs.enqueue(job)
        except BaseException:
            if admitted is not None:
                admitted.release()
            raise
        if admitted is not None:  # however the job ends (the runner gives it back first, as it finishes)
            done.add_done_callback(_releasing(admitted))
        if task.delivery_method == "async":
            await emit(Outcome(item=ack_item(task.task_type, task.task_uuid)))
            return
        # Shielded: a client that hangs up does not cancel accepted work; its result stays pollable.
        outcome = await asyncio.shield(done)
        if outcome is None:  # finished by another process (a cluster worker)
            if request.session is not None:
                return  # and delivered to the session already, on whichever node it is attached now
            outcome = await self.results.finished(task.task_uuid, request.base_url)
        if outcome.item is not None:
            request.reply_budget.take_item(outcome.item)  # else payloadTooLarge: the result stays pollable
        await emit(outcome)

    async def _rehearse(self, task: UpscaleTask) -> WireItem:
        """A dry run: a taskUUID already used is refused as a real run would refuse it (without claiming)."""
        if await asyncio.to_thread(self.results.records.get, task.task_uuid) is not None:
            raise ConflictTaskUUIDError.for_task(task.task_uuid)
        return await self.checks.rehearse(task)


class UpscaleRunner:
    """The running half: turns a job into a recorded result item (or error)."""

    def __init__(
        self,
        lifecycle: TaskLifecycle,
        inference: InferenceService,
        images: TaskImages,
        outbound: OutboundClient,
        *,
        cost_per_megapixel: float,
    ) -> None:
        self.lifecycle = lifecycle
        self.inference = inference
        self.images = images
        self.outbound = outbound
        self.checks = UpscaleChecks(inference, images, cost_per_megapixel=cost_per_megapixel)

    async def execute(self, job: UpscaleJob) -> Outcome:
        """Run ``job`` and record its outcome (the job queue's executor); never raises."""
        task = job.task
        return await self.lifecycle.execute(
            task.task_type, task.task_uuid, job.base_url, self.run(job), webhook_url=task.webhook_url
        )

    async def give_up(self, job: UpscaleJob) -> Outcome:
        """Record ``job`` as failed without running it (it crashed the workers that ran it), and notify."""
        task = job.task
        return await self.lifecycle.execute(
            task.task_type, task.task_uuid, job.base_url, _crashed(), webhook_url=task.webhook_url
        )

    async def run(self, job: UpscaleJob) -> WireItem:
        task = job.task
        self.checks.check_model(task)  # an unknown model or a factor it does not take fails before any I/O
        data, input_uuid = await self.images.input_bytes(task.image, task.image_parameter)
        memory, what = await self.checks.memory_cost(task, data)
        # The reservation made at admission, else (an input URL, a cluster worker) a wait for room.
        async with self.images.budget.hold(job.output_uuid, memory, what=what, parameter=task.image_parameter):
            output, url, fields, input_uuid, plan = await self._pixels(job, data, input_uuid)
        if task.upload_endpoint:
            try:
                await upload_output(self.outbound, task.upload_endpoint, output.data, output.image.content_type)
            except UploadFailedError as exc:
                exc.message += f"; the result is kept as imageUUID {output.image.uuid} at {url}"
                raise
        cost = self.checks.cost(*plan.output_size) if task.include_cost else None
        return upscale_item(task.task_type, task.task_uuid, output.image.uuid, input_uuid, fields, cost)

    async def _pixels(
        self, job: UpscaleJob, data: bytes, input_uuid: str | None
    ) -> tuple[StoredOutput, str, WireItem, str, UpscalePlan]:
        """Decode, plan, upscale, encode and store: the part that holds pixels, all of which are gone when
        it returns. Returns the stored output, its URL, the reply field, the input's UUID and the plan."""
        task = job.task
        picture = await self.images.decode(data, task.image_parameter)
        plan = await self.checks.plan(task, picture)
        # An inline input is stored while the network runs: only the reply needs its UUID.
        storing = (
            None
            if input_uuid is not None
            else asyncio.ensure_future(self.images.store_input(data, picture, job.input_uuid))
        )
        try:
            result = await self.inference.run(picture, plan, label=task.task_uuid)
            output, url, fields = await self.images.in_codecs(self._store_result, result, job)
        except BaseException:
            if storing is not None:  # the task failed: its input's UUID is never reported
                storing.cancel()
                storing.add_done_callback(_outcome_ignored)
                await asyncio.wait([storing])  # a running store holds the picture: the reservation outlives it
            raise
        if storing is not None:
            input_uuid = (await storing).uuid
        assert input_uuid is not None
        return output, url, fields, input_uuid, plan

    def _store_result(self, result: Picture, job: UpscaleJob) -> tuple[StoredOutput, str, WireItem]:
        """Encode once, store under the job's output UUID, and build the reply field from the same bytes (in
        the codec pool: the base64 of a big output is work too). Returns the output, its URL and the field."""
        task, base_url = job.task, job.base_url
        output = store_output(
            self.images.storage,
            result,
            output_format=task.output_format,
            quality=task.output_quality,
            ttl_seconds=task.ttl if task.output_type == "URL" else None,
            image_uuid=job.output_uuid,
            executor=self.images.codecs,  # a big PNG is deflated in stripes on the pool's idle threads
        )
        url = image_url(base_url, output.image)
        if task.output_type == "URL":
            return output, url, image_output("URL", url)
        if task.output_type == "base64Data":
            return output, url, image_output("base64Data", base64_text(output.data))
        return output, url, image_output("dataURI", data_uri(output.image, output.data))


def _releasing(reservation: Reservation) -> Callable[[object], None]:
    """A done-callback that gives ``reservation`` back."""
    return lambda _: reservation.release()


async def _crashed() -> WireItem:
    raise TaskCrashedWorkersError()


def _outcome_ignored(task: asyncio.Future[Any]) -> None:
    """Mark a background step's error as seen: the task failed for another reason already."""
    if not task.cancelled():
        task.exception()

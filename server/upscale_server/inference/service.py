"""The one face of inference: the rest of the server plans, submits, runs and times upscales here.

Tasks, the app and the CLI never reach into the model registry, the pipeline's internals or the
worker; they hold an :class:`InferenceService` and ask it. Everything behind it (architectures,
weights, the engine, the runtime) can then change without touching a task.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from upscale_server.config import Settings
from upscale_server.errors import InvalidModelError, UpscaleError
from upscale_server.imaging import Picture
from upscale_server.inference.engine.base import Progress
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.pipeline import UpscalePipeline, UpscalePlan, check_factor, served_factors
from upscale_server.inference.registry import ModelRegistry
from upscale_server.inference.runtime.compute import ComputeConfig
from upscale_server.inference.runtime.devices import bind_thread
from upscale_server.inference.runtime.worker import InferenceWorker
from upscale_server.inference.weights.manifest import ModelSpec

log = logging.getLogger(__name__)

#: Called on the worker thread after each network run: (seconds, output pixels). Must not raise.
InferenceObserver = Callable[[float, int], None]


@dataclass(frozen=True)
class ModelInfo:
    """What a client may know about a model: its id, name and description, its native scale and the
    factors it serves (none for a restoration model)."""

    id: str
    name: str
    description: str
    scale: int
    factors: tuple[int, ...]


def _factors(spec: ModelSpec) -> tuple[int, ...]:
    try:
        return served_factors(spec)
    except InvalidModelError:
        return ()


class InferenceService:
    """Upscales pictures on one device for the whole process.

    Two ways in: :meth:`run` (async) queues the work on the inference worker, whose threads own the
    device, so a burst of requests waits there instead of fighting over memory; :meth:`upscale`
    (blocking) runs in the caller's thread, for the CLI, which upscales one file at a time and has
    no worker. Call :meth:`start` before :meth:`run` and :meth:`stop` at the end.
    """

    def __init__(
        self, settings: Settings, compute: ComputeConfig, *, observer: InferenceObserver | None = None
    ) -> None:
        self._settings = settings
        self._registry = ModelRegistry(settings, compute)
        self._pipeline = UpscalePipeline(self._registry)
        self._observer = observer
        device = compute.device
        self._worker = InferenceWorker(concurrency=settings.worker_concurrency, thread_init=lambda: bind_thread(device))
        self._warmup: threading.Thread | None = None
        if self._registry.resize_engine:
            log.warning(
                "test-target mode (UPSCALE_ENGINE=resize): a plain resize replaces the models; not for production"
            )
        if settings.worker_concurrency > 1 and self._registry.batcher is None:
            log.warning(
                "UPSCALE_WORKER_CONCURRENCY=%d without cross-request batching (UPSCALE_BATCH_WINDOW_MS): "
                "concurrent jobs only share the device",
                settings.worker_concurrency,
            )

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start the worker and, when configured, load the default model in the background."""
        self._worker.start()
        if self._settings.preload_default_model:
            self._warmup = threading.Thread(target=self._warm_default_model, name="model-warmup", daemon=True)
            self._warmup.start()

    def stop(self, grace_seconds: float) -> None:
        """Let queued and running work finish for up to ``grace_seconds``, fail the rest, release the device."""
        self._worker.stop(grace_seconds)
        self._registry.close()  # after the worker: only a job past the grace period can still be batching
        if self._warmup is not None:
            self._warmup.join()

    def _warm_default_model(self) -> None:
        """Load the default model; on CUDA also run its window shapes once (:meth:`Upscaler.warm_up`),
        so cudnn's benchmark and torch.compile do not stall the first requests."""
        try:
            upscaler = self._registry.upscaler(self._registry.spec(None))
        except UpscaleError as exc:
            log.warning("default model not loaded at start-up: %s", exc.message)
            return
        if isinstance(upscaler, Upscaler) and self._registry.compute.device.type == "cuda":
            started = time.perf_counter()
            shapes = upscaler.warm_up()
            log.info("warmed up %d window shapes in %.1f s", len(shapes), time.perf_counter() - started)

    # ------------------------------------------------------------------ models

    def check_model(self, model_id: str | None) -> str:
        """The id that ``model_id`` names (the default model for None); InvalidModelError if unknown.

        A manifest id reads nothing from disk; another id lists the models folder and reads the header
        of a file that is new or changed (shapes only): cheap enough for the event loop, so an unknown
        model fails before any image I/O.
        """
        return self._registry.spec(model_id).id

    def upscale_factors(self, model_id: str | None, *, schema: bool = True) -> tuple[int, ...]:
        """The factors ``model_id`` serves (up to its native scale); with ``schema`` (the ``upscale``
        task) only those its Runware schema also lists. InvalidModelError for a restoration model."""
        spec = self._registry.spec(model_id)
        served = served_factors(spec)
        listed = spec.upscale_factors if schema and spec.upscale_factors else served
        return tuple(f for f in listed if f in served) or served

    def check_factor(self, model_id: str | None, factor: int, *, schema: bool = True) -> None:
        """InvalidUpscaleFactorError naming the model's factors unless it serves ``factor``."""
        check_factor(self._registry.spec(model_id), factor, self.upscale_factors(model_id, schema=schema))

    def models(self) -> tuple[ModelInfo, ...]:
        """Every model, the files dropped into the models folder included (rescanned now: blocking)."""
        return tuple(
            ModelInfo(spec.id, spec.name, spec.description, spec.native_factors[-1], _factors(spec))
            for spec in self._registry.models()
        )

    def model_loaded(self) -> bool:
        """Whether the default model is loaded (readiness)."""
        return self._registry.is_loaded(self._registry.spec(None).id)

    # ------------------------------------------------------------------ upscaling

    def plan(self, width: int, height: int, factor: int, model_id: str | None) -> UpscalePlan:
        """Decide what will run for a ``width`` x ``height`` picture. Blocking (it may look at weight
        files to pick a native-scale model): call it from a thread."""
        return self._pipeline.plan(width, height, factor, model_id)

    def plan_target(self, width: int, height: int, megapixels: float, model_id: str | None) -> UpscalePlan:
        """Like :meth:`plan`, for an output of ``megapixels`` million pixels (``targetMegapixels``)."""
        return self._pipeline.plan_target(width, height, megapixels, model_id)

    def canvas_sizes(self, plan: UpscalePlan) -> tuple[tuple[int, int], ...]:
        """The full-size images running ``plan`` holds besides its input, for the memory budget: the output,
        and with the resize engine the model's native-scale image it resizes the output from (the real
        engine makes the output size window by window, so that one never exists there)."""
        if not self._registry.resize_engine:
            return (plan.output_size,)
        scale = plan.model.scale
        native = (plan.input_size[0] * scale, plan.input_size[1] * scale)
        return (plan.output_size,) if native == plan.output_size else (plan.output_size, native)

    def submit(self, picture: Picture, plan: UpscalePlan, *, label: str) -> Future[Picture]:
        """Queue ``plan`` on the worker; the future resolves with the upscaled picture or its error."""
        return self._worker.submit(lambda: self._timed(picture, plan), label=label)

    async def run(self, picture: Picture, plan: UpscalePlan, *, label: str) -> Picture:
        """:meth:`submit` and wait, without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(picture, plan, label=label))

    def upscale(
        self, picture: Picture, factor: int, model_id: str | None = None, *, progress: Progress | None = None
    ) -> Picture:
        """Plan and run in the calling thread (the CLI): exactly ``factor`` x, gray, alpha and depth kept."""
        plan = self._pipeline.plan(picture.width, picture.height, factor, model_id)
        return self._pipeline.run(picture, plan, progress=progress)

    def _timed(self, picture: Picture, plan: UpscalePlan) -> Picture:
        """Run on the worker thread: times the network, not the wait in the queue."""
        started = time.perf_counter()
        result = self._pipeline.run(picture, plan)
        if self._observer is not None:
            self._observer(time.perf_counter() - started, result.width * result.height)
        return result

    # ------------------------------------------------------------------ state

    @property
    def worker_state(self) -> str:
        """ "starting", "running", "stopping" or "stopped"."""
        return self._worker.state.value

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the worker."""
        return self._worker.queue_depth

    def describe(self) -> str:
        return self._registry.compute.describe()

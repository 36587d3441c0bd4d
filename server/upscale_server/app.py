"""The FastAPI application: ``create_app(settings)`` builds the server's parts in order and wires the routes.

Start-up order matters, and :func:`start_parts` is written in it: the backends first (tasks a previous
process left running are marked failed before anyone can poll them), then metrics, outbound delivery,
the codec pool and inference, then the task handlers; only then do the routes take requests. Each part
registers its own teardown on one exit stack, so shutdown runs in exactly the reverse order: running
tasks get their grace period first, then the worker stops, then the codec pool, webhook delivery and
outbound client close, and the database closes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from fastapi import FastAPI

from upscale_server import __version__
from upscale_server.api import rest, ws
from upscale_server.api.auth import ApiKeys
from upscale_server.api.context import ServerContext
from upscale_server.api.origins import OriginGuard
from upscale_server.backends import open_backends
from upscale_server.budget import MemoryBudget
from upscale_server.config import Settings, UnusableSettingError
from upscale_server.delivery import WebhookSender
from upscale_server.inference import ComputeConfig, InferenceService, check_model_aliases
from upscale_server.observability import health
from upscale_server.observability.health import HealthSource
from upscale_server.observability.logs import set_node_name
from upscale_server.observability.metrics import Metrics
from upscale_server.outbound import OutboundClient, OutboundPolicy
from upscale_server.protocol import GetResponseTask, ImageUploadTask, PingTask, UpscaleTask
from upscale_server.storage.sweeper import sweep_forever
from upscale_server.tasks.dispatcher import TaskDispatcher
from upscale_server.tasks.images import TaskImages
from upscale_server.tasks.lifecycle import TaskLifecycle
from upscale_server.tasks.ping import handle_ping
from upscale_server.tasks.poll import GetResponseHandler
from upscale_server.tasks.results import RecordedResults
from upscale_server.tasks.upload import UploadHandler
from upscale_server.tasks.upscale import UpscaleChecks, UpscaleHandler, UpscaleRunner
from upscale_server.web import routes as web

log = logging.getLogger(__name__)


#: What a process does. ``all``: the API and the inference worker (the single process, or a cluster
#: node that also runs jobs); ``api``: a cluster API node, no model; ``worker``: a cluster worker, whose
#: only routes are the probes.
Role = Literal["all", "api", "worker"]


def create_app(settings: Settings, role: Role = "all") -> FastAPI:
    """The app for ``settings``. Nothing is opened yet: the parts are built when the app starts.

    Settings this machine cannot honour (a CUDA device without CUDA, an unreadable key file, a cluster
    role without Redis) raise :class:`~upscale_server.config.UnusableSettingError` here, before a server
    starts.
    """
    if role != "all" and not settings.redis_url:
        raise UnusableSettingError(f"the {role} role is part of a cluster: set UPSCALE_REDIS_URL and UPSCALE_S3_BUCKET")
    if settings.redis_url and not settings.s3_bucket:
        raise UnusableSettingError("cluster mode (UPSCALE_REDIS_URL) needs UPSCALE_S3_BUCKET, the bucket for images")
    compute = ComputeConfig.from_settings(settings)
    check_model_aliases(settings.model_aliases)
    keys = ApiKeys.load(settings.api_keys, settings.api_keys_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            app.state.context, app.state.observability = await start_parts(settings, compute, keys, stack, role)
            yield

    app = FastAPI(
        title="Upscale Server",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if settings.api_docs else None,
        redoc_url=None,  # a CDN script too, and /docs is enough when it is wanted
    )
    app.include_router(health.router)  # /health, /ready, /metrics: no API key, like every probe endpoint
    if role != "worker":
        app.add_middleware(OriginGuard, settings=settings)
        app.include_router(rest.router)
        app.include_router(ws.router)
        app.include_router(web.router)
    return app


async def start_parts(
    settings: Settings,
    compute: ComputeConfig,
    keys: ApiKeys,
    stack: contextlib.AsyncExitStack,
    role: Role = "all",
) -> tuple[ServerContext, HealthSource]:
    """Build every part in order, registering each one's teardown on ``stack``; returns what the routes read."""
    runs_jobs = role != "api"
    if keys.open_mode and role != "worker":
        log.warning(
            "no API keys configured: open local mode, any API key is accepted and every client shares one "
            "tenant (each can poll every task and resume every session); set UPSCALE_API_KEYS to separate clients"
        )
    backends = await open_backends(settings, consume=runs_jobs)
    stack.push_async_callback(backends.close)
    set_node_name(backends.node if backends.cluster else None)

    metrics = Metrics()
    outbound = OutboundClient(
        OutboundPolicy.parse(
            settings.outbound_allow,
            max_redirects=settings.outbound_max_redirects,
            connect_timeout=settings.outbound_connect_timeout,
            total_timeout=settings.outbound_timeout,
        ),
        max_deliveries=settings.max_deliveries_in_flight,
    )
    stack.push_async_callback(outbound.aclose)
    webhooks = WebhookSender(
        outbound,
        max_attempts=settings.webhook_max_attempts,
        give_up_after=settings.webhook_give_up_after,
        on_result=metrics.webhook,
    )
    # Tasks that just finished may be notifying.
    stack.push_async_callback(webhooks.aclose, settings.shutdown_grace_seconds)
    # Decoding and encoding get their own bounded pool: never the worker's threads (the device would
    # wait for PNG), and not the default executor that SQLite and file reads share.
    codec_threads = settings.resolved_encode_workers()
    codecs = ThreadPoolExecutor(codec_threads, thread_name_prefix="codec")
    stack.push_async_callback(asyncio.to_thread, functools.partial(codecs.shutdown, wait=True, cancel_futures=True))
    # Built in a thread: it reads the model manifest. An API node builds it only to know the models.
    inference = await asyncio.to_thread(InferenceService, settings, compute, observer=metrics.inference_done)
    if runs_jobs:
        inference.start()
        stack.push_async_callback(asyncio.to_thread, inference.stop, settings.shutdown_grace_seconds)

    # One budget for every task of this process, whichever transport or connection it came in.
    budget = MemoryBudget(settings.resolved_memory_budget())
    images = TaskImages(
        backends.images,
        outbound,
        codecs,
        budget=budget,
        max_fetch_bytes=settings.max_fetch_bytes,
        max_input_pixels=settings.max_input_pixels,
        upload_max_side=settings.upload_max_side,
        keep_metadata=settings.keep_metadata,
    )
    lifecycle = TaskLifecycle(backends.records, webhooks, metrics)
    results = RecordedResults(backends.records, backends.images)
    backends.bind_results(results.frame)
    upscale_checks = UpscaleChecks(inference, images, cost_per_megapixel=settings.cost_per_megapixel)
    if runs_jobs:
        runner = UpscaleRunner(lifecycle, inference, images, outbound, cost_per_megapixel=settings.cost_per_megapixel)
        backends.jobs.start(runner.execute, runner.give_up)
    dispatcher = TaskDispatcher(
        {
            PingTask: handle_ping,
            ImageUploadTask: UploadHandler(lifecycle, images),
            UpscaleTask: UpscaleHandler(
                backends.jobs, results, outbound, upscale_checks, admit_in_process=not backends.cluster
            ),
            GetResponseTask: GetResponseHandler(results),
        },
        metrics,
        max_reply_bytes=settings.max_reply_bytes,
    )
    metrics.watch(
        queue_depth=(lambda: inference.queue_depth) if runs_jobs else None,
        in_flight=lambda: backends.jobs.in_flight,
        storage_stats=backends.images.stats,
        cuda_device=compute.device if compute.device.type == "cuda" and runs_jobs else None,
        cluster_queue=backends.queue_figures,
        memory_reserved=lambda: budget.used,
    )

    if role != "worker":  # in a cluster the API nodes sweep (twice is harmless); workers keep to jobs
        stop_sweeping = asyncio.Event()
        sweeper = asyncio.create_task(
            sweep_forever([backends.images, backends.records], settings.sweep_interval_seconds, stop=stop_sweeping)
        )
        stack.push_async_callback(_stop_task, sweeper, stop_sweeping)
    for work in backends.background:
        stop_work = asyncio.Event()
        stack.push_async_callback(_stop_task, asyncio.create_task(work(stop_work)), stop_work)
    stack.push_async_callback(backends.jobs.drain, settings.shutdown_grace_seconds)  # the first thing a stop does

    context = ServerContext(
        settings=settings,
        keys=keys,
        images=backends.images,
        dispatcher=dispatcher,
        sessions=backends.sessions,
        models=inference.models,
    )
    checks = dict(backends.ready_checks)
    if backends.cluster and runs_jobs:
        checks["heartbeat"] = functools.partial(_heartbeat_check, backends.heartbeat_age, settings.worker_dead_seconds)
    # A cluster process keeps nothing on its own disk; the single process's data folder must stay writable.
    data_dir = None if backends.cluster else await asyncio.to_thread(settings.data_dir.expanduser().resolve)
    observability = HealthSource(
        worker_state=(lambda: inference.worker_state) if runs_jobs else (lambda: "none (API node)"),
        model_loaded=inference.model_loaded,
        data_dir=data_dir,
        metrics=metrics,
        require_model=settings.preload_default_model,  # else nothing loads it until a request comes
        runs_models=runs_jobs,
        checks=checks,
    )
    log.info(
        "%s on %s; models on %s; %d codec threads; memory budget %.0f MiB",
        {"all": "serving", "api": "API node serving", "worker": "worker running"}[role],
        settings.host,
        inference.describe() if runs_jobs else "the workers",
        codec_threads,
        budget.limit / 2**20,
    )
    return context, observability


async def _heartbeat_check(age: Callable[[], float | None], dead_seconds: float) -> tuple[bool, str]:
    """A worker is ready while its heartbeat in Redis is younger than the dead threshold."""
    seconds = age()
    if seconds is None:
        return False, "no heartbeat yet"
    return seconds < dead_seconds, f"{seconds:.1f} s ago"


async def _stop_task(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    await task

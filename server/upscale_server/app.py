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
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI

from upscale_server import __version__
from upscale_server.api import rest, ws
from upscale_server.api.auth import ApiKeys
from upscale_server.api.context import ServerContext
from upscale_server.backends import open_local_backends
from upscale_server.config import Settings
from upscale_server.delivery import WebhookSender
from upscale_server.inference import ComputeConfig, InferenceService
from upscale_server.observability import health
from upscale_server.observability.health import HealthSource
from upscale_server.observability.metrics import Metrics
from upscale_server.outbound import OutboundClient, OutboundPolicy
from upscale_server.protocol import GetResponseTask, ImageUploadTask, PingTask, UpscaleTask
from upscale_server.storage.sweeper import sweep_forever
from upscale_server.tasks.dispatcher import TaskDispatcher
from upscale_server.tasks.images import TaskImages
from upscale_server.tasks.lifecycle import TaskLifecycle
from upscale_server.tasks.ping import handle_ping
from upscale_server.tasks.poll import GetResponseHandler
from upscale_server.tasks.upload import UploadHandler
from upscale_server.tasks.upscale import UpscaleHandler, UpscaleRunner
from upscale_server.web import routes as web

log = logging.getLogger(__name__)

#: How long a stopping server lets accepted tasks (and then the worker, then webhooks) finish.
SHUTDOWN_GRACE_SECONDS = 30.0


def create_app(settings: Settings) -> FastAPI:
    """The app for ``settings``. Nothing is opened yet: the parts are built when the app starts.

    Settings this machine cannot honour (a CUDA device without CUDA, an unreadable key file) raise
    :class:`~upscale_server.config.UnusableSettingError` here, before a server starts.
    """
    compute = ComputeConfig.from_settings(settings)
    keys = ApiKeys.load(settings.api_keys, settings.api_keys_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            app.state.context, app.state.observability = await start_parts(settings, compute, keys, stack)
            yield

    app = FastAPI(title="Upscale Server", version=__version__, lifespan=lifespan)
    app.include_router(rest.router)
    app.include_router(health.router)  # /health, /ready, /metrics: no API key, like every probe endpoint
    app.include_router(ws.router)
    app.include_router(web.router)
    return app


async def start_parts(
    settings: Settings, compute: ComputeConfig, keys: ApiKeys, stack: contextlib.AsyncExitStack
) -> tuple[ServerContext, HealthSource]:
    """Build every part in order, registering each one's teardown on ``stack``; returns what the routes read."""
    if keys.open_mode:
        log.warning("no API keys configured: open local mode, any API key is accepted")
    backends = await asyncio.to_thread(open_local_backends, settings)
    stack.callback(backends.close)

    metrics = Metrics()
    outbound = OutboundClient(
        OutboundPolicy.parse(
            settings.outbound_allow,
            max_redirects=settings.outbound_max_redirects,
            connect_timeout=settings.outbound_connect_timeout,
            total_timeout=settings.outbound_timeout,
        )
    )
    stack.push_async_callback(outbound.aclose)
    webhooks = WebhookSender(
        outbound,
        max_attempts=settings.webhook_max_attempts,
        give_up_after=settings.webhook_give_up_after,
        on_result=metrics.webhook,
    )
    stack.push_async_callback(webhooks.aclose, SHUTDOWN_GRACE_SECONDS)  # tasks that just finished may be notifying
    # Decoding and encoding get their own bounded pool: never the worker's threads (the device would
    # wait for PNG), and not the default executor that SQLite and file reads share.
    codec_threads = settings.resolved_encode_workers()
    codecs = ThreadPoolExecutor(codec_threads, thread_name_prefix="codec")
    stack.push_async_callback(asyncio.to_thread, functools.partial(codecs.shutdown, wait=True, cancel_futures=True))
    # Built in a thread: it reads the model manifest.
    inference = await asyncio.to_thread(InferenceService, settings, compute, observer=metrics.inference_done)
    inference.start()
    stack.push_async_callback(asyncio.to_thread, inference.stop, SHUTDOWN_GRACE_SECONDS)

    images = TaskImages(
        backends.images,
        outbound,
        codecs,
        max_fetch_bytes=settings.max_fetch_bytes,
        max_input_pixels=settings.max_input_pixels,
        upload_max_side=settings.upload_max_side,
    )
    lifecycle = TaskLifecycle(backends.records, backends.jobs, webhooks, metrics)
    runner = UpscaleRunner(lifecycle, inference, images, outbound, cost_per_megapixel=settings.cost_per_megapixel)
    backends.jobs.start(runner.execute)
    dispatcher = TaskDispatcher(
        {
            PingTask: handle_ping,
            ImageUploadTask: UploadHandler(lifecycle, images),
            UpscaleTask: UpscaleHandler(lifecycle, backends.jobs, outbound),
            GetResponseTask: GetResponseHandler(backends.records, backends.images),
        },
        metrics,
    )
    metrics.watch(
        queue_depth=lambda: inference.queue_depth,
        in_flight=lambda: backends.jobs.in_flight,
        storage_stats=backends.images.stats,
        cuda_device=compute.device if compute.device.type == "cuda" else None,
    )

    stop_sweeping = asyncio.Event()
    sweeper = asyncio.create_task(
        sweep_forever([backends.images, backends.records], settings.sweep_interval_seconds, stop=stop_sweeping)
    )
    stack.push_async_callback(_stop_task, sweeper, stop_sweeping)
    stack.push_async_callback(backends.jobs.drain, SHUTDOWN_GRACE_SECONDS)  # the first thing a stop does

    context = ServerContext(
        settings=settings,
        keys=keys,
        images=backends.images,
        dispatcher=dispatcher,
        sessions=backends.sessions,
        models=inference.models(),
    )
    observability = HealthSource(
        worker_state=lambda: inference.worker_state,
        model_loaded=inference.model_loaded,
        data_dir=await asyncio.to_thread(lambda: settings.data_dir.expanduser().resolve()),
        metrics=metrics,
        require_model=settings.preload_default_model,  # else nothing loads it until a request comes
    )
    log.info(
        "serving on %s; models on %s; %d codec threads",
        settings.host,
        inference.describe(),
        codec_threads,
    )
    return context, observability


async def _stop_task(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    await task

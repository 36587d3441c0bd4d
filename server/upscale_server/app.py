"""The FastAPI application: ``create_app(settings)`` wires storage, models, the worker and the routes.

Start-up order matters: storage first (so tasks interrupted by a restart are marked failed before
anyone can poll them), then the worker and the codec pool, then the routes start taking requests.
Shutdown is the reverse: stop taking work, let running tasks finish within a grace period, stop the
worker, the codec pool and the batcher, close storage last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from upscale_server import __version__
from upscale_server.api import rest, ws
from upscale_server.api.auth import ApiKeys
from upscale_server.api.sessions import SessionRegistry
from upscale_server.api.state import ServerState
from upscale_server.config import Settings
from upscale_server.delivery import WebhookSender
from upscale_server.inference import ComputeConfig, InferenceService
from upscale_server.observability import health
from upscale_server.observability.health import HealthSource
from upscale_server.observability.metrics import Metrics
from upscale_server.outbound import OutboundClient, OutboundPolicy
from upscale_server.storage.db import Database, open_database
from upscale_server.storage.images import ImageStore
from upscale_server.storage.results import TaskRecord, TaskStore
from upscale_server.storage.sweeper import sweep_forever
from upscale_server.tasks.dispatcher import TaskDispatcher
from upscale_server.web import routes as web

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 30.0


def interrupted_error(record: TaskRecord) -> dict[str, Any]:
    return {
        "code": "taskInterrupted",
        "message": "the server restarted while this task was running; send it again with a new taskUUID",
        "taskType": record.task_type,
        "taskUUID": record.task_uuid,
        "status": "error",
    }


def create_app(settings: Settings) -> FastAPI:
    """The app for ``settings``; UnusableSettingError when this machine cannot honour a compute setting."""
    compute = ComputeConfig.from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        data_dir = settings.data_dir.expanduser().resolve()
        db, images, results = open_storage(settings, data_dir)
        keys = ApiKeys.from_settings(settings)
        if keys.open_mode:
            log.warning("no API keys configured: open local mode, any API key is accepted")
        # Decoding and encoding get their own bounded pool: never the worker's threads (the device would
        # wait for PNG), and not the default executor that SQLite and file reads share.
        codec_threads = settings.resolved_encode_workers()
        codecs = ThreadPoolExecutor(codec_threads, thread_name_prefix="codec")
        device = compute.device
        metrics = Metrics(
            queue_depth=lambda: inference.queue_depth,  # read at scrape time, after the service exists
            in_flight=lambda: dispatcher.in_flight,  # read at scrape time, after the dispatcher exists
            storage_stats=images.stats,
            cuda_device=device if device.type == "cuda" else None,
        )
        inference = InferenceService(settings, compute, observer=metrics.inference_done)
        inference.start()
        outbound = OutboundClient(
            OutboundPolicy.parse(
                settings.outbound_allow,
                max_redirects=settings.outbound_max_redirects,
                connect_timeout=settings.outbound_connect_timeout,
                total_timeout=settings.outbound_timeout,
            )
        )
        webhooks = WebhookSender(
            outbound,
            max_attempts=settings.webhook_max_attempts,
            give_up_after=settings.webhook_give_up_after,
            on_result=metrics.webhook,
        )
        dispatcher = TaskDispatcher(
            settings=settings,
            images=images,
            results=results,
            inference=inference,
            outbound=outbound,
            webhooks=webhooks,
            metrics=metrics,
            codecs=codecs,
        )
        app.state.observability = HealthSource(
            worker_state=lambda: inference.worker_state,
            model_loaded=inference.model_loaded,
            data_dir=data_dir,
            metrics=metrics,
            require_model=settings.preload_default_model,  # else nothing loads it until a request comes
        )
        sessions = SessionRegistry(resume_seconds=settings.session_resume_seconds)
        app.state.server = ServerState(
            settings=settings, keys=keys, images=images, dispatcher=dispatcher, sessions=sessions
        )
        stop = asyncio.Event()
        sweeper = asyncio.create_task(sweep_forever([images, results], settings.sweep_interval_seconds, stop=stop))
        log.info("serving on %s; models on %s; %d codec threads", settings.host, inference.describe(), codec_threads)
        try:
            yield
        finally:
            stop.set()
            await dispatcher.drain(SHUTDOWN_GRACE_SECONDS)
            await asyncio.to_thread(inference.stop, SHUTDOWN_GRACE_SECONDS)
            await asyncio.to_thread(codecs.shutdown, wait=True, cancel_futures=True)
            await sweeper
            await webhooks.aclose(SHUTDOWN_GRACE_SECONDS)  # tasks that just finished may still be notifying
            await outbound.aclose()
            db.close()

    app = FastAPI(title="Upscale Server", version=__version__, lifespan=lifespan)
    app.include_router(rest.router)
    app.include_router(health.router)  # /health, /ready, /metrics: no API key, like every probe endpoint
    app.include_router(ws.router)
    app.include_router(web.router)
    return app


def open_storage(settings: Settings, data_dir: Path) -> tuple[Database, ImageStore, TaskStore]:
    """The database and stores, with tasks a restart interrupted already marked failed."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(data_dir / "upscale.sqlite3")
    images = ImageStore(db, data_dir / "images", retention_seconds=settings.image_retention_days * 86400)
    results = TaskStore(db, result_ttl_seconds=settings.result_ttl_seconds)
    interrupted = results.fail_unfinished(interrupted_error)
    if interrupted:
        log.warning("%d task(s) were running when the server stopped; marked as failed", interrupted)
    return db, images, results

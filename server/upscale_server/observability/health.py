"""``GET /health`` (liveness), ``GET /ready`` (readiness) and ``GET /metrics`` (Prometheus).

Liveness and readiness are separate on purpose (Triton's ``/v2/health/live|ready``, BentoML's
``/healthz``/``/readyz``): an orchestrator restarts a process whose liveness fails, but only stops
routing to one that is not ready. Loading the default model takes seconds on a cold start, and a
process that is still loading must not be killed for it, so ``/health`` answers 200 whenever the
process serves HTTP and reports the worker state (cog's ``/health-check`` idea) for humans and
smarter probes; ``/ready`` is 503 until the default model is loaded, the worker runs and the data
folder is writable, and names the checks that fail.

The routes read a :class:`HealthSource` from ``app.state.observability`` (set in the app's lifespan)
and never touch a model: a probe every second costs a dict lookup, an attribute read and, for
``/ready``, creating and deleting one small file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from upscale_server.observability.metrics import Metrics

router = APIRouter(tags=["observability"])

#: Probes must be answered fresh: a cached "ready" from a proxy would hide an outage.
NO_STORE = {"Cache-Control": "no-store"}

#: The worker state in which the server takes work (``WorkerState.RUNNING.value``).
WORKER_RUNNING = "running"

#: How long ``/ready`` waits for the storage write test. A hung disk (a dead network mount) makes the
#: check fail after this long instead of hanging the probe until the orchestrator's own timeout.
STORAGE_CHECK_TIMEOUT_SECONDS = 2.0

WRITABLE = "writable"


@dataclass
class HealthSource:
    """What the probes read, built in the app's lifespan and stored at ``app.state.observability``.

    ``worker_state()`` returns the inference worker's state name ("starting", "running", "stopping",
    "stopped"); ``model_loaded()`` whether the default model is loaded. With ``require_model`` False
    (the app does not preload the default model) readiness does not wait for it: the first request
    loads it, and no request would ever come to a server that is never ready. ``data_dir`` is the
    folder that must stay writable (images and the SQLite database live under it); None when the
    process keeps nothing on its disk (a cluster node). ``runs_models`` is False on a cluster's API
    node, which loads no model. ``checks`` are further named checks (a cluster's Redis, S3, heartbeat),
    each bounded by the storage timeout.
    """

    worker_state: Callable[[], str]
    model_loaded: Callable[[], bool]
    data_dir: Path | None
    metrics: Metrics
    require_model: bool = True
    runs_models: bool = True
    checks: Mapping[str, Callable[[], Awaitable[tuple[bool, str]]]] = field(default_factory=dict)
    storage_timeout: float = STORAGE_CHECK_TIMEOUT_SECONDS
    _storage_probe: _StorageProbe = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._storage_probe = _StorageProbe()

    async def check_storage(self) -> str:
        """``"writable"``, or why the data folder cannot be written."""
        assert self.data_dir is not None
        return await self._storage_probe.check(self.data_dir, self.storage_timeout)

    async def run_checks(self, worker: str) -> dict[str, tuple[bool, str]]:
        """Every check that applies to this process, by name: (passed, detail); ``worker`` is the
        worker state the probe read."""
        results: dict[str, tuple[bool, str]] = {}
        if self.runs_models:
            results["model"] = _model_check(self)
            results["worker"] = (worker == WORKER_RUNNING, worker)
        if self.data_dir is not None:
            results["storage"] = _storage_result(await self.check_storage())
        for name, check in self.checks.items():
            try:
                results[name] = await asyncio.wait_for(check(), self.storage_timeout)
            except TimeoutError:
                results[name] = (False, f"no answer after {self.storage_timeout:g} s")
        return results


class _StorageProbe:
    """Runs the write test in its own short-lived thread, at most one at a time.

    Not ``asyncio.to_thread``: a write stuck on a hung disk would hold one of the default executor's
    few threads (6 on 2 cores) forever, and every probe would take another, until the dispatcher's
    own ``to_thread`` calls starve. Here a stuck test blocks one thread, and later probes wait on that
    same test (and fail after the timeout) instead of starting new ones.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[str] | None = None

    async def check(self, folder: Path, timeout: float) -> str:
        with self._lock:
            pending = self._pending
            if pending is None or pending.done():
                pending = concurrent.futures.Future()
                self._pending = pending
                threading.Thread(
                    target=_run_write_test, args=(folder, pending), name="ready-storage-check", daemon=True
                ).start()
        try:
            # shield: a timeout must not cancel the shared future other probes may be waiting on.
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(pending)), timeout)
        except TimeoutError:
            return f"write test still running after {timeout:g} s (storage slow or hung)"


def _run_write_test(folder: Path, result: concurrent.futures.Future[str]) -> None:
    try:
        result.set_result(write_test(folder))
    except BaseException as exc:  # pragma: no cover - write_test catches what a filesystem raises
        result.set_exception(exc)


def write_test(folder: Path) -> str:
    """Create, write and delete a small temp file in ``folder``: ``"writable"``, or why that failed.

    The reason names the error (``PermissionError: Permission denied``) but not the path: ``/ready``
    needs no authentication, so it should not describe the server's file system.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=".ready-", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            Path(name).unlink()
    except OSError as exc:
        return f"not writable ({exc.__class__.__name__}: {exc.strerror or exc})"
    return WRITABLE


def observability(request: Request) -> HealthSource | None:
    """The app's :class:`HealthSource`, or None before the lifespan has set it up."""
    source: HealthSource | None = getattr(request.app.state, "observability", None)
    return source


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 as long as the process answers HTTP, whatever the worker does."""
    source = observability(request)
    worker = _worker_state(source) if source is not None else "starting"
    return JSONResponse({"status": "alive", "worker": worker}, headers=NO_STORE)


@router.api_route("/ready", methods=["GET", "HEAD"])
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when the server can do an upscale now, else 503 naming what is missing."""
    source = observability(request)
    if source is None:
        body: dict[str, Any] = {"status": "unavailable", "worker": "starting", "checks": {}, "failing": ["startup"]}
        return JSONResponse(body, status_code=503, headers=NO_STORE)
    worker = _worker_state(source)
    results = await source.run_checks(worker)
    checks = {name: detail for name, (_, detail) in results.items()}
    failing = [name for name, (passed, _) in results.items() if not passed]
    body = {"status": "unavailable" if failing else "ready", "worker": worker, "checks": checks}
    if failing:
        body["failing"] = failing
    return JSONResponse(body, status_code=503 if failing else 200, headers=NO_STORE)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """The Prometheus scrape. Rendered in a thread: the stored-image gauges read SQLite."""
    source = observability(request)
    if source is None:
        return Response("metrics are not set up yet\n", status_code=503, media_type="text/plain")
    payload, content_type = await asyncio.to_thread(source.metrics.render)
    return Response(payload, headers={"Content-Type": content_type, **NO_STORE})


def _worker_state(source: HealthSource) -> str:
    try:
        return source.worker_state()
    except Exception as exc:  # a probe must answer even when what it reads is broken
        return f"unknown ({exc.__class__.__name__})"


def _model_check(source: HealthSource) -> tuple[bool, str]:
    try:
        loaded = source.model_loaded()
    except Exception as exc:
        return False, f"unknown ({exc.__class__.__name__})"
    if loaded:
        return True, "loaded"
    if not source.require_model:
        return True, "not loaded (preload is off: the first request loads it)"
    return False, "not loaded"


def _storage_result(detail: str) -> tuple[bool, str]:
    return detail == WRITABLE, detail

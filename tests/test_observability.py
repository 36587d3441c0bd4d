"""Health, readiness, metrics and structured logs, on a tiny app with fake sources (no model, no worker)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from upscale_server.inference.runtime.worker import InferenceWorker
from upscale_server.observability import health
from upscale_server.observability.health import HealthSource, write_test
from upscale_server.observability.logs import (
    UVICORN_LOGGERS,
    TaskContextFilter,
    configure_logging,
    parse_level,
    task_context,
)
from upscale_server.observability.metrics import MAX_TASK_SERIES, Metrics

TASK = "19abad0d-6ec5-40a6-b7af-203775fa5b7f"


class FakeServer:
    """Stands in for the worker, the registry and the image store: values the test sets."""

    def __init__(self) -> None:
        self.worker = "running"
        self.loaded = True
        self.queue = 0
        self.in_flight = 0
        self.stats = (0, 0)
        self.stats_calls = 0

    def storage_stats(self) -> tuple[int, int]:
        self.stats_calls += 1
        return self.stats


def make_app(fake: FakeServer, data_dir: Path, *, require_model: bool = True) -> tuple[FastAPI, Metrics]:
    metrics = Metrics()
    metrics.watch(
        queue_depth=lambda: fake.queue,
        in_flight=lambda: fake.in_flight,
        storage_stats=fake.storage_stats,
        cuda_device=None,
    )
    app = FastAPI()
    app.include_router(health.router)
    app.state.observability = HealthSource(
        worker_state=lambda: fake.worker,
        model_loaded=lambda: fake.loaded,
        data_dir=data_dir,
        metrics=metrics,
        require_model=require_model,
    )
    return app, metrics


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


@pytest.fixture
def client(fake: FakeServer, tmp_path: Path) -> Iterator[TestClient]:
    app, _ = make_app(fake, tmp_path)
    with TestClient(app) as test_client:
        yield test_client


def scrape(client: TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` from ``GET /metrics``."""
    response = client.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


# ------------------------------------------------------------------------------------ health, ready


def test_health_is_200_with_the_worker_state_whatever_the_checks_say(fake: FakeServer, client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "alive", "worker": "running"}
    fake.worker, fake.loaded = "stopping", False
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "alive", "worker": "stopping"}
    assert response.headers["cache-control"] == "no-store"
    assert client.head("/health").status_code == 200


def test_health_answers_before_the_lifespan_has_set_anything_up() -> None:
    app = FastAPI()
    app.include_router(health.router)
    with TestClient(app) as test_client:
        assert test_client.get("/health").json() == {"status": "alive", "worker": "starting"}
        response = test_client.get("/ready")
        assert response.status_code == 503
        assert response.json()["failing"] == ["startup"]
        assert test_client.get("/metrics").status_code == 503


def test_ready_when_model_loaded_worker_running_and_storage_writable(client: TestClient) -> None:
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "worker": "running",
        "checks": {"model": "loaded", "worker": "running", "storage": "writable"},
    }


def test_ready_is_503_naming_the_model_while_it_is_not_loaded(fake: FakeServer, client: TestClient) -> None:
    fake.loaded = False
    response = client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["failing"] == ["model"]
    assert body["checks"]["model"] == "not loaded"
    fake.loaded = True
    assert client.get("/ready").status_code == 200


def test_ready_does_not_wait_for_a_model_that_is_not_preloaded(fake: FakeServer, tmp_path: Path) -> None:
    fake.loaded = False
    app, _ = make_app(fake, tmp_path, require_model=False)
    with TestClient(app) as test_client:
        response = test_client.get("/ready")
    assert response.status_code == 200
    assert response.json()["checks"]["model"].startswith("not loaded")


@pytest.mark.parametrize("state", ["starting", "stopping", "stopped"])
def test_ready_is_503_naming_the_worker_when_it_is_not_running(
    fake: FakeServer, client: TestClient, state: str
) -> None:
    fake.worker = state
    body = client.get("/ready").json()
    assert body["failing"] == ["worker"]
    assert body["checks"]["worker"] == state


def test_ready_is_503_naming_storage_when_the_data_dir_cannot_be_written(fake: FakeServer, tmp_path: Path) -> None:
    # A folder "inside" a regular file cannot be written even by root, unlike a chmod-ed folder.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    app, _ = make_app(fake, blocker / "data")
    with TestClient(app) as test_client:
        response = test_client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["storage"]
    assert body["checks"]["storage"].startswith("not writable (NotADirectoryError")
    assert str(tmp_path) not in body["checks"]["storage"]  # no paths in an unauthenticated answer


def test_ready_names_every_failing_check(fake: FakeServer, tmp_path: Path) -> None:
    fake.worker, fake.loaded = "stopped", False
    app, _ = make_app(fake, tmp_path / "missing")
    with TestClient(app) as test_client:
        assert test_client.get("/ready").json()["failing"] == ["model", "worker", "storage"]


def test_the_storage_write_test_leaves_nothing_behind(tmp_path: Path) -> None:
    assert write_test(tmp_path) == "writable"
    assert list(tmp_path.iterdir()) == []


def test_a_hung_storage_check_times_out_and_is_not_started_twice(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    started: list[Path] = []

    def hung_write_test(folder: Path) -> str:
        started.append(folder)
        release.wait(10)
        return "writable"

    monkeypatch.setattr(health, "write_test", hung_write_test)
    app, _ = make_app(fake, tmp_path)
    app.state.observability.storage_timeout = 0.05
    with TestClient(app) as test_client:
        first = test_client.get("/ready").json()
        second = test_client.get("/ready").json()
        assert first["failing"] == second["failing"] == ["storage"]
        assert "still running" in first["checks"]["storage"]
        assert len(started) == 1  # the second probe waited on the first test instead of starting another
        release.set()
        for _ in range(100):  # the finished test lets the next probe start a fresh one
            if test_client.get("/ready").status_code == 200:
                break
        assert test_client.get("/ready").status_code == 200


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_exposes_every_series_with_its_labels_and_values(fake: FakeServer, tmp_path: Path) -> None:
    fake.queue, fake.in_flight, fake.stats = 3, 5, (7, 12345)
    app, metrics = make_app(fake, tmp_path)
    metrics.task_finished("imageUpscale", "success")
    metrics.task_finished("imageUpscale", "success")
    metrics.task_finished("imageUpscale", "queueFull")
    metrics.task_finished("imageUpload", "success")
    metrics.inference_done(0.2, 2048 * 1024)
    metrics.inference_done(42.0, 4096 * 4096)
    metrics.webhook("delivered")
    metrics.webhook("retried")
    metrics.webhook("retried")
    with TestClient(app) as test_client:
        response = test_client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = scrape(test_client)

    tasks = samples["upscale_tasks_total"]
    assert tasks[(("outcome", "success"), ("task_type", "imageUpscale"))] == 2
    assert tasks[(("outcome", "queueFull"), ("task_type", "imageUpscale"))] == 1
    assert tasks[(("outcome", "success"), ("task_type", "imageUpload"))] == 1
    assert samples["upscale_queue_depth"][()] == 3
    assert samples["upscale_in_flight_tasks"][()] == 5
    assert samples["upscale_stored_images"][()] == 7
    assert samples["upscale_stored_bytes"][()] == 12345
    assert samples["upscale_inference_seconds_count"][()] == 2
    assert samples["upscale_inference_seconds_sum"][()] == pytest.approx(42.2)
    assert samples["upscale_inference_seconds_bucket"][(("le", "0.25"),)] == 1
    assert samples["upscale_inference_seconds_bucket"][(("le", "60.0"),)] == 2
    assert samples["upscale_output_megapixels_count"][()] == 2
    assert samples["upscale_output_megapixels_sum"][()] == pytest.approx((2048 * 1024 + 4096 * 4096) / 1e6)
    assert samples["upscale_output_megapixels_bucket"][(("le", "4.0"),)] == 1
    assert samples["upscale_output_megapixels_bucket"][(("le", "16.777216"),)] == 2  # 4096x4096 is in
    webhooks = samples["upscale_webhook_deliveries_total"]
    assert webhooks == {(("result", "delivered"),): 1, (("result", "retried"),): 2, (("result", "given_up"),): 0}
    assert "upscale_gpu_memory_bytes" not in samples  # CPU: no GPU series at all
    assert "process_resident_memory_bytes" in samples or not Path("/proc/self/stat").exists()


def test_storage_stats_are_read_at_scrape_time_only(fake: FakeServer, tmp_path: Path) -> None:
    app, _ = make_app(fake, tmp_path)
    with TestClient(app) as test_client:
        assert fake.stats_calls == 0  # building and registering the metrics read nothing
        test_client.get("/health")
        test_client.get("/ready")
        assert fake.stats_calls == 0
        fake.stats = (1, 10)
        assert scrape(test_client)["upscale_stored_images"][()] == 1
        fake.stats = (2, 30)
        samples = scrape(test_client)
    assert fake.stats_calls == 2
    assert samples["upscale_stored_images"][()] == 2
    assert samples["upscale_stored_bytes"][()] == 30


def test_a_failing_source_drops_only_its_own_series(
    fake: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> tuple[int, int]:
        raise RuntimeError("database is locked")

    metrics = Metrics(process_metrics=False)
    metrics.watch(queue_depth=lambda: 4, storage_stats=broken)
    with caplog.at_level(logging.WARNING, logger="upscale_server.observability.metrics"):
        first = metrics.render()[0].decode()
        second = metrics.render()[0].decode()
    assert "upscale_queue_depth 4.0" in first
    assert "upscale_stored_images" not in first
    assert first == second
    assert len([r for r in caplog.records if "storage_stats" in r.getMessage()]) == 1  # logged once, not per scrape


def test_label_values_from_clients_cannot_grow_the_series_without_bound() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.task_finished("imageUpscale", "success")
    for i in range(MAX_TASK_SERIES + 50):
        metrics.task_finished(f"junk{i}", "invalidTaskType")
    metrics.task_finished("imageUpscale", "success")  # a series seen before the cap keeps counting
    families = {f.name: f for f in text_string_to_metric_families(metrics.render()[0].decode())}
    totals = [s for s in families["upscale_tasks"].samples if s.name == "upscale_tasks_total"]
    assert len(totals) == MAX_TASK_SERIES + 1  # the capped series plus ("other", "other")
    by_labels = {(s.labels["task_type"], s.labels["outcome"]): s.value for s in totals}
    assert by_labels[("imageUpscale", "success")] == 2
    assert by_labels[("other", "other")] == 51
    assert sum(by_labels.values()) == MAX_TASK_SERIES + 52


def test_label_values_that_are_not_identifiers_become_other() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.task_finished('<script>"', "invalid code!")
    metrics.task_finished("x" * 65, "success")
    text = metrics.render()[0].decode()
    assert 'upscale_tasks_total{outcome="other",task_type="other"} 1.0' in text
    assert 'upscale_tasks_total{outcome="success",task_type="other"} 1.0' in text
    assert "script" not in text


def test_event_methods_ignore_values_they_cannot_record() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.inference_done(float("nan"), 0)
    metrics.inference_done(-1.0, -5)
    metrics.webhook("exploded")
    text = metrics.render()[0].decode()
    assert "upscale_inference_seconds_count 0.0" in text
    assert "upscale_output_megapixels_count 0.0" in text
    assert "exploded" not in text


def test_apps_in_one_process_keep_separate_metrics() -> None:
    first, second = Metrics(process_metrics=False), Metrics(process_metrics=False)
    first.webhook("given_up")
    assert 'upscale_webhook_deliveries_total{result="given_up"} 1.0' in first.render()[0].decode()
    assert 'upscale_webhook_deliveries_total{result="given_up"} 0.0' in second.render()[0].decode()


def test_gpu_memory_series_when_a_cuda_device_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1024)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4096)
    metrics = Metrics(process_metrics=False)
    metrics.watch(cuda_device=torch.device("cuda:0"))
    text = metrics.render()[0].decode()
    assert 'upscale_gpu_memory_bytes{device="cuda:0",kind="allocated"} 1024.0' in text
    assert 'upscale_gpu_memory_bytes{device="cuda:0",kind="reserved"} 4096.0' in text


# --------------------------------------------------------------------------------------------- logs


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """A stream that ``configure_logging`` writes to; the root and uvicorn loggers are restored afterwards."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in UVICORN_LOGGERS)]
    saved = [(logger, list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    stream = io.StringIO()
    try:
        yield stream
    finally:
        for logger, handlers, level, propagate in saved:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_parse_and_carry_the_task_uuid_inside_a_task_context(log_stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=log_stream)
    log = logging.getLogger("upscale_server.tasks.dispatcher")
    log.info("before")
    with task_context(TASK):
        log.info("upscaling %s", "cat.png")
        try:
            raise ValueError("bad pixels")
        except ValueError:
            log.exception("failed")
    log.debug("not shown at info")
    before, inside, failed = json_lines(log_stream)
    assert "taskUUID" not in before
    assert inside["taskUUID"] == TASK
    assert inside["message"] == "upscaling cat.png"
    assert inside["level"] == "INFO"
    assert inside["logger"] == "upscale_server.tasks.dispatcher"
    assert str(inside["time"]).endswith("+00:00")
    assert failed["taskUUID"] == TASK
    assert failed["level"] == "ERROR"
    assert "ValueError: bad pixels" in str(failed["exc_info"])


def test_the_inference_worker_runs_a_job_in_its_submitters_task(log_stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=log_stream)
    log = logging.getLogger("upscale_server.inference.runtime.worker")

    def job() -> None:
        log.info("running on the worker")

    worker = InferenceWorker()
    worker.start()
    try:
        with task_context(TASK):
            worker.submit(job, label=TASK).result(timeout=30)
    finally:
        worker.stop(5)
    plain = threading.Thread(target=job)  # a hand-made thread runs outside any task
    with task_context("other-task"):
        plain.start()
        plain.join()
    on_worker, on_plain = json_lines(log_stream)
    assert on_worker["taskUUID"] == TASK
    assert "taskUUID" not in on_plain


def test_to_thread_carries_the_callers_task(log_stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=log_stream)
    log = logging.getLogger("upscale_server.tasks.dispatcher")

    def job() -> None:
        log.info("in a thread")

    async def main() -> None:
        async def one(task_uuid: str) -> None:
            with task_context(task_uuid):
                await asyncio.sleep(0)
                await asyncio.to_thread(job)

        await asyncio.gather(one("task-a"), one("task-b"))  # concurrent tasks keep their own UUID

    asyncio.run(main())
    uuids = [line["taskUUID"] for line in json_lines(log_stream)]
    assert sorted(str(u) for u in uuids) == ["task-a", "task-b"]


def test_plain_lines_show_the_task_uuid(log_stream: io.StringIO) -> None:
    configure_logging("plain", "debug", stream=log_stream)
    log = logging.getLogger("upscale_server.app")
    log.debug("starting")
    with task_context(TASK):
        log.warning("slow input")
    log.info("explicit", extra={"taskUUID": "given-uuid"})
    outside, inside, explicit = log_stream.getvalue().splitlines()
    assert outside.endswith(" DEBUG upscale_server.app: starting")
    assert inside.endswith(f" WARNING upscale_server.app [{TASK}]: slow input")
    assert explicit.endswith(" INFO upscale_server.app [given-uuid]: explicit")


def test_uvicorn_loggers_use_the_same_handler(log_stream: io.StringIO) -> None:
    uvicorn_error = logging.getLogger("uvicorn.error")
    own_handler = logging.StreamHandler(io.StringIO())
    uvicorn_error.addHandler(own_handler)
    uvicorn_error.propagate = False  # what uvicorn's default log config does
    configure_logging("json", "info", stream=log_stream)
    uvicorn_error.info("Started server process")
    assert json_lines(log_stream)[0]["logger"] == "uvicorn.error"
    assert own_handler not in uvicorn_error.handlers


def test_successful_probe_access_lines_are_left_out(log_stream: io.StringIO) -> None:
    configure_logging("plain", "info", stream=log_stream)
    access = logging.getLogger("uvicorn.access")
    line = '%s - "%s %s HTTP/%s" %d'
    access.info(line, "127.0.0.1:5000", "GET", "/ready", "1.1", 200)
    access.info(line, "127.0.0.1:5000", "GET", "/metrics?x=1", "1.1", 200)
    access.info(line, "127.0.0.1:5000", "GET", "/ready", "1.1", 503)
    access.info(line, "127.0.0.1:5000", "POST", "/v1", "1.1", 200)
    lines = log_stream.getvalue().splitlines()
    assert [entry.split(" - ")[1] for entry in lines] == ['"GET /ready HTTP/1.1" 503', '"POST /v1 HTTP/1.1" 200']
    configure_logging("plain", "info", stream=log_stream, quiet_probes=False)
    access.info(line, "127.0.0.1:5000", "GET", "/health", "1.1", 200)
    assert log_stream.getvalue().splitlines()[-1].endswith('"GET /health HTTP/1.1" 200')


def test_configure_logging_refuses_unknown_formats_and_levels(log_stream: io.StringIO) -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml", "info", stream=log_stream)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("plain", "loud", stream=log_stream)
    assert parse_level("WARNING") == parse_level("warning") == logging.WARNING


def test_the_filter_keeps_an_explicit_task_uuid() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.taskUUID = "explicit"
    with task_context(TASK):
        assert TaskContextFilter().filter(record)
    assert getattr(record, "taskUUID", None) == "explicit"

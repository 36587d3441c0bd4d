"""Prometheus metrics for one server instance, in a registry of its own.

Why a registry per :class:`Metrics` and not prometheus-client's global one: the tests build many apps
in one process, and the global registry refuses a second metric with the same name.

Two kinds of values live here. Events (a task finished, an inference ran, a webhook was sent) are
pushed by the code that sees them through tiny methods that never raise: metrics must not be able to
fail a task. Levels (queue depth, tasks in flight, stored images and bytes, GPU memory) are pulled from
callbacks at scrape time by :class:`_ScrapeTimeCollector`, so nothing reads SQLite or asks the CUDA
allocator between scrapes, and a callback that fails drops its own series from that scrape instead of
failing the whole ``/metrics`` answer.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    import torch

    from upscale_server.queue import QueueFigures

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What ``render`` produces: the classic text format, which every Prometheus version scrapes.
#: (prometheus-client >= 0.22 calls this ``CONTENT_TYPE_PLAIN_0_0_4``; ``CONTENT_TYPE_LATEST`` now says
#: 1.0.0, which older scrapers do not know. ``generate_latest`` writes the same bytes for both.)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: 10 ms (a tiny image on a GPU) to 300 s (a 4096x4096 output on a slow CPU), roughly x2 to x2.5 apart.
INFERENCE_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

#: Output sizes: 256x256 (0.07 MP) up to the default cap of 4096x4096 (16.78 MP) and beyond it for
#: servers that raise ``max_output_side``.
OUTPUT_MEGAPIXELS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.777216, 32.0, 64.0)

WEBHOOK_RESULTS = frozenset({"delivered", "retried", "given_up"})

#: Label values come partly from clients (a taskType the parser refused is still counted), so each
#: value must look like an identifier and the number of (task_type, outcome) series is capped: a client
#: sending random task types must not grow the scrape without bound.
_LABEL_VALUE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
MAX_TASK_SERIES = 200
OTHER = "other"


class Metrics:
    """The server's metrics; ``render()`` is the body of ``GET /metrics``.

    Built first, so every part can report events to it; the levels read at scrape time are
    registered afterwards, with :meth:`watch`, once the parts that have them exist.
    """

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        self._tasks = Counter(
            "upscale_tasks",
            "Tasks finished, by taskType and outcome (success, or the Runware error code).",
            ["task_type", "outcome"],
            registry=self.registry,
        )
        self._inference_seconds = Histogram(
            "upscale_inference_seconds",
            "Time the inference worker spent on one upscale (queue wait excluded).",
            buckets=INFERENCE_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._output_megapixels = Histogram(
            "upscale_output_megapixels",
            "Size of each upscaled output, in megapixels (width x height / 1e6).",
            buckets=OUTPUT_MEGAPIXELS_BUCKETS,
            registry=self.registry,
        )
        self._webhooks = Counter(
            "upscale_webhook_deliveries",
            "Webhook attempts by result: delivered, retried (one per resend) or given_up.",
            ["result"],
            registry=self.registry,
        )
        for result in sorted(WEBHOOK_RESULTS):
            self._webhooks.labels(result=result)  # export zeros, so rate() works from the first event
        self._task_series: set[tuple[str, str]] = set()
        self._series_lock = threading.Lock()
        if process_metrics:
            # CPU seconds, resident memory and open files of this process, like the default registry has.
            ProcessCollector(registry=self.registry)

    def watch(
        self,
        *,
        queue_depth: Callable[[], int] | None = None,
        in_flight: Callable[[], int] | None = None,
        storage_stats: Callable[[], tuple[int, int]] | None = None,
        cuda_device: torch.device | None = None,
        cluster_queue: Callable[[], QueueFigures] | None = None,
        memory_reserved: Callable[[], int] | None = None,
    ) -> None:
        """Register the levels read at scrape time; call once. A series whose source is None is left out.

        ``queue_depth``: jobs waiting for the inference worker. ``in_flight``: upscale tasks accepted
        and not finished (fetching, decoding, queued or running). ``storage_stats``: ``(image count,
        total bytes)``, called once per scrape from the scraping thread. ``cuda_device``: the CUDA
        device the models run on, or None on the CPU (no GPU series then). ``cluster_queue``: the shared
        queue's figures (a cluster node or worker), one Redis round trip per scrape. ``memory_reserved``:
        bytes of the memory budget reserved by tasks now.
        """
        self.registry.register(
            _ScrapeTimeCollector(queue_depth, in_flight, storage_stats, cuda_device, memory_reserved)
        )
        if cluster_queue is not None:
            self.registry.register(_ClusterQueueCollector(cluster_queue))

    def task_finished(self, task_type: str, outcome: str) -> None:
        """Count one finished task; ``outcome`` is "success" or the error item's ``code``."""
        try:
            self._tasks.labels(*self._task_labels(task_type, outcome)).inc()
        except Exception:  # pragma: no cover - metrics must never fail a task
            log.debug("could not count a finished task", exc_info=True)

    def inference_done(self, seconds: float, output_pixels: int) -> None:
        """Record one finished upscale: worker time and output size (``width * height``)."""
        try:
            if math.isfinite(seconds) and seconds >= 0:
                self._inference_seconds.observe(seconds)
            if output_pixels > 0:
                self._output_megapixels.observe(output_pixels / 1e6)
        except Exception:  # pragma: no cover - metrics must never fail a task
            log.debug("could not record an inference", exc_info=True)

    def webhook(self, result: str) -> None:
        """Count one webhook event: "delivered", "retried" (a resend) or "given_up"; others are ignored."""
        if result not in WEBHOOK_RESULTS:
            log.debug("unknown webhook result %r not counted", result)
            return
        try:
            self._webhooks.labels(result=result).inc()
        except Exception:  # pragma: no cover - metrics must never fail a delivery
            log.debug("could not count a webhook", exc_info=True)

    def render(self) -> tuple[bytes, str]:
        """The scrape: (payload, content type). Calls the scrape-time callbacks, so may block briefly
        on SQLite: call it from a thread in async code."""
        return generate_latest(self.registry), CONTENT_TYPE

    def _task_labels(self, task_type: str, outcome: str) -> tuple[str, str]:
        labels = (_label_value(task_type), _label_value(outcome))
        with self._series_lock:
            if labels in self._task_series:
                return labels
            if len(self._task_series) >= MAX_TASK_SERIES:
                return OTHER, OTHER
            self._task_series.add(labels)
            return labels


def _label_value(value: object) -> str:
    return value if isinstance(value, str) and _LABEL_VALUE_RE.fullmatch(value) else OTHER


class _ScrapeTimeCollector:
    """Reads levels from callbacks when Prometheus scrapes, never in between.

    ``describe`` names the families without calling anything, so registering this collector does not
    touch the database either.
    """

    def __init__(
        self,
        queue_depth: Callable[[], int] | None,
        in_flight: Callable[[], int] | None,
        storage_stats: Callable[[], tuple[int, int]] | None,
        cuda_device: torch.device | None,
        memory_reserved: Callable[[], int] | None = None,
    ) -> None:
        self._queue_depth = queue_depth
        self._memory_reserved = memory_reserved
        self._in_flight = in_flight
        self._storage_stats = storage_stats
        self._cuda_device = cuda_device
        self._failing: set[str] = set()  # sources whose failure was logged; logged again once they recover

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        queue, in_flight, images, size, gpu, budget = families
        if self._queue_depth is not None and (depth := self._read("queue_depth", self._queue_depth)) is not None:
            queue.add_metric([], depth)
        if self._in_flight is not None and (running := self._read("in_flight", self._in_flight)) is not None:
            in_flight.add_metric([], running)
        if self._storage_stats is not None and (stats := self._read("storage_stats", self._storage_stats)) is not None:
            images.add_metric([], stats[0])
            size.add_metric([], stats[1])
        if self._cuda_device is not None and (memory := self._read("gpu_memory", self._gpu_memory)) is not None:
            for kind, size_bytes in memory:
                gpu.add_metric([str(self._cuda_device), kind], size_bytes)
        if (
            self._memory_reserved is not None
            and (reserved := self._read("memory_reserved", self._memory_reserved)) is not None
        ):
            budget.add_metric([], reserved)
        # A family with no sample is left out: no GPU series on CPU, none for a failing callback.
        return [family for family in families if family.samples]

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("upscale_queue_depth", "Upscale jobs waiting for the inference worker."),
            GaugeMetricFamily(
                "upscale_in_flight_tasks", "Upscale tasks accepted and not finished (any stage, queue included)."
            ),
            GaugeMetricFamily("upscale_stored_images", "Images stored (uploads and outputs, unswept ones included)."),
            GaugeMetricFamily("upscale_stored_bytes", "Total size of the stored image files, in bytes."),
            GaugeMetricFamily(
                "upscale_gpu_memory_bytes",
                "CUDA memory held by PyTorch's caching allocator: allocated (in tensors) and reserved.",
                labels=["device", "kind"],
            ),
            GaugeMetricFamily(
                "upscale_memory_reserved_bytes",
                "Bytes of the memory budget (UPSCALE_MEMORY_BUDGET_BYTES) reserved by tasks holding pixels.",
            ),
        )

    def _gpu_memory(self) -> list[tuple[str, float]]:
        import torch

        device = self._cuda_device
        # Both read the allocator's own counters: no device synchronisation, safe from any thread.
        return [
            ("allocated", float(torch.cuda.memory_allocated(device))),
            ("reserved", float(torch.cuda.memory_reserved(device))),
        ]

    def _read(self, name: str, source: Callable[[], T]) -> T | None:
        try:
            value = source()
        except Exception:
            if name not in self._failing:
                self._failing.add(name)
                log.warning("metrics source %s failed; its series are left out until it recovers", name, exc_info=True)
            return None
        if name in self._failing:
            self._failing.discard(name)
            log.info("metrics source %s recovered", name)
        return value


class _ClusterQueueCollector:
    """The cluster's queue as every node and worker sees it (the same figures on each: scrape any)."""

    def __init__(self, source: Callable[[], QueueFigures]) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        try:
            figures = self._source()
        except Exception as exc:
            log.warning("cluster queue figures unavailable (%s); left out of this scrape", exc.__class__.__name__)
            return []
        values = (
            figures.waiting,
            figures.running,
            figures.oldest_wait_seconds,
            figures.redeliveries,
            figures.dead_lettered,
            figures.workers_alive,
        )
        for family, value in zip(families, values, strict=True):
            family.add_metric([], value)
        return list(families)

    def _families(self) -> tuple[GaugeMetricFamily | CounterMetricFamily, ...]:
        return (
            GaugeMetricFamily("upscale_cluster_queue_waiting", "Jobs in the cluster queue not yet taken by a worker."),
            GaugeMetricFamily("upscale_cluster_queue_running", "Jobs a worker holds (running, or its worker died)."),
            GaugeMetricFamily(
                "upscale_cluster_queue_oldest_wait_seconds", "Age of the oldest job no worker has taken yet."
            ),
            CounterMetricFamily(
                "upscale_cluster_redeliveries", "Jobs run again because the worker running them stopped."
            ),
            CounterMetricFamily(
                "upscale_cluster_dead_lettered", "Jobs set aside after crashing their workers too often."
            ),
            GaugeMetricFamily(
                "upscale_cluster_workers_alive", "Workers whose heartbeat is younger than the dead threshold."
            ),
        )

"""The wired app answers /health, /ready and /metrics, and its task logs carry the taskUUID."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api_helpers import api_client, data_uri, encode, photo_crop, resize_settings, upscale_task
from upscale_server.observability.logs import JsonFormatter, TaskContextFilter


@pytest.mark.local_only  # counts one process's events: in a cluster each node counts only its own
def test_wired_app(tmp_path: Path) -> None:
    settings = resize_settings(tmp_path, preload_default_model=True)  # ready once the default model loaded
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TaskContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    try:
        with api_client(settings) as client:
            assert client.get("/health").json()["worker"] == "running"
            while client.get("/ready").status_code != 200:  # the default model loads in the background
                time.sleep(0.01)
            task = upscale_task(data_uri(encode(photo_crop())))
            bad = upscale_task("not-an-image")
            response = client.post("/v1", json=[task, bad])
            assert response.status_code == 200, response.text
            text = client.get("/metrics").text
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("upscale_tasks_total", (("outcome", "success"), ("task_type", "imageUpscale")))] == 1
    assert samples[("upscale_tasks_total", (("outcome", "invalidInputImage"), ("task_type", "imageUpscale")))] == 1
    assert samples[("upscale_inference_seconds_count", ())] == 1
    assert samples[("upscale_output_megapixels_sum", ())] == 48 * 32 / 1e6
    assert samples[("upscale_stored_images", ())] == 2
    assert samples[("upscale_queue_depth", ())] == 0
    tagged = [json.loads(r) for r in records if task["taskUUID"] in r]
    assert any(line.get("taskUUID") == task["taskUUID"] for line in tagged)

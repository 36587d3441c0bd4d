"""Kill and restart: what a server process leaves in its data dir is what the next one answers from.

A SIGKILL (no shutdown at all) while upscales run must leave finished results pollable, running tasks
reported as failed with ``taskInterrupted`` (never ``processing`` forever) and uploads usable by UUID.
A SIGTERM lets a running task finish within the grace period, so its result is there after a restart.

The servers run the resize engine. A task is kept running by a local receiver that holds its answer
until the test says so: its input URL (the task waits for its image) or its ``uploadEndpoint`` (the
image is made, the task waits to deliver it). "Running" is then a fact the test observes (the receiver
has the request, ``getResponse`` says ``processing``), not a bet on how long an upscale takes.
"""

from __future__ import annotations

import io
import signal
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from tests.api_helpers import data_uri, encode, photo_crop
from tests.e2e.conftest import live_server_at
from tests.support.http_receiver import HttpReceiver, held, ok
from upscale_server.testing import UpscaleTestServer

SMALL_MODEL = "local:realesr-animevideov3@1"
API_KEY = "restart-key"  # the same key for the server and for the one restarted on its data dir
#: Each resize takes this long: the worker is still busy with the released task while the server shuts down.
RESIZE_DELAY = {"UPSCALE_RESIZE_DELAY_SECONDS": "1"}


def post(server: UpscaleTestServer, tasks: list[dict[str, Any]], timeout: float = 60) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    response = httpx.post(server.rest_url, json=tasks, headers=headers, timeout=timeout)
    assert response.status_code < 500, response.text
    return response.status_code, response.json()


def upscale(image: str, **fields: Any) -> dict[str, Any]:
    task = {
        "taskType": "imageUpscale",
        "taskUUID": str(uuid.uuid4()),
        "inputImage": image,
        "model": SMALL_MODEL,
        "upscaleFactor": 2,
        "outputFormat": "PNG",
    }
    return {key: value for key, value in {**task, **fields}.items() if value is not None}


def poll(server: UpscaleTestServer, task_uuid: str) -> tuple[int, dict[str, Any]]:
    """The getResponse item of a task (a data or an error item) and the reply's HTTP status."""
    status, body = post(server, [{"taskType": "getResponse", "taskUUID": task_uuid}])
    items = body.get("data", []) + body.get("errors", [])
    assert len(items) == 1 and items[0]["taskUUID"] == task_uuid, body
    return status, items[0]


def wait_finished(server: UpscaleTestServer, task_uuid: str, guard: float = 60) -> dict[str, Any]:
    """Poll until the task is no longer ``processing`` (``guard`` seconds only turn a hang into a failure)."""
    deadline = time.monotonic() + guard
    while True:
        _, item = poll(server, task_uuid)
        if item.get("status") in ("success", "error"):
            return item
        assert time.monotonic() < deadline, f"task {task_uuid} still {item} after {guard} s"
        time.sleep(0.05)


def wait_not_listening(port: int, guard: float = 60) -> None:
    """Block until nothing accepts connections on ``port`` any more (the server began shutting down)."""
    deadline = time.monotonic() + guard
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        assert time.monotonic() < deadline, f"port {port} still accepts connections after {guard} s"
        time.sleep(0.02)


def fetch_size(server: UpscaleTestServer, image_url: str) -> tuple[int, int]:
    """The size of a stored image, fetched from ``server`` by the path of its imageURL (whatever port the
    URL names: it was issued by the process that made the image)."""
    response = httpx.get(server.url + urlsplit(image_url).path, timeout=30)
    assert response.status_code == 200, (image_url, response.status_code)
    with Image.open(io.BytesIO(response.content)) as image:
        return image.size


def test_sigkill_keeps_finished_results_and_fails_running_tasks(tmp_path: Path) -> None:
    """Proves that after SIGKILL and a restart on the same data dir: the sync and async results that had
    finished are returned by getResponse with the same imageUUID and their images are served; the tasks
    that were still running answer ``status: error`` with ``taskInterrupted`` (not ``processing``), whether
    they were waiting for their input or for the upload of their output; and an upload from before the kill
    still works as an input by UUID."""
    never = threading.Event()  # the receiver answers neither request before the kill
    big = encode(photo_crop(160, 160, left=180, top=150))
    with HttpReceiver({"/input.png": held(never, ok(big, "image/png")), "/bucket/out.png": held(never)}) as receiver:
        with live_server_at(tmp_path, api_key=API_KEY) as first:
            _, body = post(
                first,
                [{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(encode(photo_crop()))}],
            )
            upload = body["data"][0]

            status, body = post(first, [upscale(upload["imageUUID"])])
            assert status == 200, body
            sync_item = body["data"][0]
            small = [
                upscale(data_uri(encode(photo_crop(16, 16, left=200 + 8 * i))), deliveryMethod="async")
                for i in range(3)
            ]
            assert post(first, small)[0] == 200
            finished = {task["taskUUID"]: wait_finished(first, task["taskUUID"]) for task in small}
            assert all(item["status"] == "success" for item in finished.values()), finished

            waiting_for_input = upscale(receiver.url("/input.png"), model=None, upscaleFactor=4, deliveryMethod="async")
            waiting_to_deliver = upscale(
                data_uri(big),
                model=None,
                upscaleFactor=4,
                deliveryMethod="async",
                uploadEndpoint=receiver.url("/bucket/out.png"),
            )
            long_tasks = [waiting_for_input, waiting_to_deliver]
            assert post(first, long_tasks)[0] == 200
            receiver.wait_for(path="/input.png")  # the first task is fetching its input: held
            (put,) = receiver.wait_for(path="/bucket/out.png")  # the second made its image and is delivering it
            assert put.method == "PUT" and put.headers["content-type"] == "image/png"
            for task in long_tasks:
                assert poll(first, task["taskUUID"])[1]["status"] == "processing"
            first.process.kill()
            first.process.wait(timeout=30)
            first_log = first.log()
        assert "Traceback" not in first_log
        assert receiver.answered == []  # both tasks were still waiting when the process died

    with live_server_at(tmp_path, api_key=API_KEY) as second:
        for task_uuid, before in [(sync_item["taskUUID"], sync_item), *finished.items()]:
            status, after = poll(second, task_uuid)
            assert status == 200 and after["status"] == "success", after
            assert after["imageUUID"] == before["imageUUID"]
            assert urlsplit(after["imageURL"]).path == urlsplit(before["imageURL"]).path  # host: see fetch_size
            expected = (48, 32) if task_uuid == sync_item["taskUUID"] else (32, 32)
            assert fetch_size(second, after["imageURL"]) == expected

        for task in long_tasks:
            status, item = poll(second, task["taskUUID"])
            assert status == 200, item
            assert item["status"] == "error" and item["code"] == "taskInterrupted", item
            assert item["taskType"] == "imageUpscale" and item["message"], item

        reuse = upscale(upload["imageUUID"], upscaleFactor=3)
        status, body = post(second, [reuse])
        assert status == 200, body
        assert body["data"][0]["inputImageUUID"] == upload["imageUUID"]
        assert fetch_size(second, body["data"][0]["imageURL"]) == (72, 48)
        assert fetch_size(second, upload["imageURL"]) == (24, 16)
        assert "Traceback" not in second.log()


def test_sigterm_lets_a_running_task_finish(tmp_path: Path) -> None:
    """Proves a graceful stop (SIGTERM) waits for a running async upscale: the task is held (its input URL
    does not answer) until the server has received SIGTERM and stopped listening; it then finishes (its
    recorded finish time is after the signal), the process exits by itself, and after a restart the task
    polls as ``success`` with a served image."""
    release = threading.Event()
    source = encode(photo_crop(256, 256, left=100, top=100))
    with HttpReceiver({"/input.png": held(release, ok(source, "image/png"))}) as receiver:
        with live_server_at(tmp_path, api_key=API_KEY, env=RESIZE_DELAY) as server:
            task = upscale(receiver.url("/input.png"), upscaleFactor=4, deliveryMethod="async")
            assert post(server, [task])[0] == 200
            receiver.wait_for(path="/input.png")
            assert poll(server, task["taskUUID"])[1]["status"] == "processing"
            signalled_at = time.time()
            server.process.terminate()
            wait_not_listening(server.port)  # shutting down, with the task still waiting for its input
            assert server.process.poll() is None, "the server exited with a task still running"
            release.set()
            # uvicorn re-raises the signal once its graceful shutdown is complete
            assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
            assert "Traceback" not in server.log()
        assert [request.path for request in receiver.answered] == ["/input.png"]

    uri = f"file:{tmp_path / 'upscale.sqlite3'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        status, finished_at = db.execute(
            "SELECT status, finished_at FROM tasks WHERE task_uuid = ?", (task["taskUUID"],)
        ).fetchone()
    db.close()
    assert status == "success"
    assert finished_at > signalled_at, "the task had finished before SIGTERM: nothing was proven"

    with live_server_at(tmp_path, api_key=API_KEY) as restarted:
        status_code, item = poll(restarted, task["taskUUID"])
        assert status_code == 200 and item["status"] == "success", item
        assert fetch_size(restarted, item["imageURL"]) == (1024, 1024)

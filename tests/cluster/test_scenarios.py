"""The cluster's promises, each proved with real processes: API nodes and workers on a real Redis and S3.

Every process runs the resize engine; ``UPSCALE_RESIZE_DELAY_SECONDS`` keeps a task running long enough
for a kill to land mid-task, and the claim timings are short (a worker that stops renewing is replaced
after about a second). Each test waits on recorded state (the task's hash in Redis, a getResponse
answer, a webhook received), never on elapsed time alone.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import time
from typing import Any

import httpx
import pytest

from tests.cluster.client import (
    Socket,
    Store,
    finished,
    new_uuid,
    png,
    poll,
    post,
    upscale,
    wait_until,
)
from tests.cluster.conftest import ClusterNames
from tests.cluster.nodes import KEY, Cluster
from tests.support import http_receiver
from tests.support.services import RedisServer, S3Server
from upscale_server.api.auth import owner_of

serve = http_receiver.serve


@pytest.fixture
def store(redis_server: RedisServer, cluster_names: ClusterNames) -> Store:
    return Store(redis_server.url, cluster_names.redis_prefix)


def output_objects(s3_server: S3Server, bucket: str) -> list[str]:
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="images/")
    return sorted(item["Key"] for item in listed.get("Contents", []))


# --------------------------------------------------------------------------- the same API from every node


def test_upload_on_one_node_upscale_on_another_poll_on_a_third_image_from_any(test_cluster: Cluster) -> None:
    (a, b, c), _ = test_cluster.start(api=3, workers=1)
    uploaded = post(a, [{"taskType": "imageUpload", "taskUUID": new_uuid(), "image": png(24, 16)}]).json()
    image_uuid = uploaded["data"][0]["imageUUID"]
    task = upscale(image_uuid, deliveryMethod="async", outputFormat="PNG")
    ack = post(b, [task])
    assert ack.status_code == 200 and ack.json()["data"][0]["taskUUID"] == task["taskUUID"]
    result = finished(c, task["taskUUID"])
    assert result["status"] == "success" and result["inputImageUUID"] == image_uuid
    assert result["imageURL"].startswith(c.url + "/image/")  # the poller's own address
    for node in (a, b, c):
        image = httpx.get(node.url + "/image/" + result["imageURL"].rpartition("/")[2], timeout=10)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content[:8] == b"\x89PNG\r\n\x1a\n"
    missing = httpx.get(a.url + f"/image/{new_uuid()}.png", timeout=10)
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == "imageNotFound"


def test_a_sync_request_waits_for_whichever_worker_ran_it(test_cluster: Cluster, store: Store) -> None:
    (a, b), _ = test_cluster.start(api=2, workers=2, resize_delay_seconds="0.3")
    tasks = [upscale(png(), outputType="base64Data") for _ in range(6)]
    with concurrent.futures.ThreadPoolExecutor(len(tasks)) as pool:
        replies = list(pool.map(lambda task: post(b, [task]), tasks))
    for task, reply in zip(tasks, replies, strict=True):
        assert reply.status_code == 200, reply.text
        item = reply.json()["data"][0]
        assert item["taskUUID"] == task["taskUUID"] and item["imageBase64Data"]
    ran_on = {store.task(task["taskUUID"])["worker"] for task in tasks}
    assert ran_on == {"worker-1", "worker-2"}  # both workers answered requests made on one node
    assert poll(a, tasks[0]["taskUUID"])["imageBase64Data"] == replies[0].json()["data"][0]["imageBase64Data"]


def test_a_websocket_client_gets_its_result_pushed_and_resumes_on_another_node(test_cluster: Cluster) -> None:
    (a, _b, c), _ = test_cluster.start(api=3, workers=1, resize_delay_seconds="1.0", session_resume_seconds="3")
    socket = Socket(a)
    first = upscale(png())
    socket.send([first])
    frame = socket.receive()
    assert frame["data"][0]["taskUUID"] == first["taskUUID"] and frame["data"][0]["imageURL"].startswith(a.url)

    second = upscale(png())
    socket.send([second])
    socket.close()  # gone before the result exists
    assert finished(c, second["taskUUID"])["status"] == "success"
    resumed = Socket(c, session=socket.session)
    assert resumed.session == socket.session
    frame = resumed.receive()  # the frame it missed, from another node, read back with that node's address
    assert frame["data"][0]["taskUUID"] == second["taskUUID"] and frame["data"][0]["imageURL"].startswith(c.url)
    resumed.close()

    third = upscale(png())
    late = Socket(a)
    late.send([third])
    late.close()
    assert finished(a, third["taskUUID"])["status"] == "success"
    time.sleep(3.5)  # past the resume window (3 s) the session and its frames are gone
    fresh = Socket(c, session=late.session)
    with pytest.raises(TimeoutError):
        fresh.receive(timeout=1.5)
    fresh.close()


def test_a_session_taken_over_on_another_node_gets_the_results_the_first_socket_would_have(
    test_cluster: Cluster,
) -> None:
    (a, b), _ = test_cluster.start(api=2, workers=1, resize_delay_seconds="1.0")
    first = Socket(a)
    task = upscale(png())
    first.send([task])
    second = Socket(b, session=first.session)  # the client reconnected elsewhere while the first socket hangs on
    frame = second.receive()
    assert frame["data"][0]["taskUUID"] == task["taskUUID"]
    with pytest.raises(TimeoutError):
        first.receive(timeout=1.0)  # the old socket does not get it too
    first.close()
    second.close()


# --------------------------------------------------------------------------- nothing accepted is lost


def test_a_worker_killed_mid_task_is_replaced_and_one_result_is_recorded(
    test_cluster: Cluster, store: Store, s3_server: S3Server, cluster_names: ClusterNames, serve: Any
) -> None:
    receiver = serve({"/hook": http_receiver.ok()})
    (a, b), workers = test_cluster.start(api=2, workers=2, resize_delay_seconds="3")
    task = upscale(png(), webhookURL=receiver.url("/hook"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(post, b, [task])
        holder = wait_until(lambda: store.task(task["taskUUID"]).get("worker"), "a worker to take the task")
        victim = next(worker for worker in workers if worker.name == holder)
        victim.kill()
        answer = reply.result(timeout=60)
    assert answer.status_code == 200, answer.text
    item = answer.json()["data"][0]
    record = store.task(task["taskUUID"])
    assert record["status"] == "success" and record["attempts"] == "2" and record["worker"] != holder
    assert poll(a, task["taskUUID"])["imageUUID"] == item["imageUUID"]
    outputs = [key for key in output_objects(s3_server, cluster_names.bucket) if item["imageUUID"] in key]
    assert outputs == [f"images/{item['imageUUID']}.jpg"]
    hooks = receiver.wait_for(1)
    time.sleep(1.0)  # a second webhook, if any were sent, would have arrived by now
    assert len(receiver.requests) == 1 and json.loads(hooks[0].body)["data"][0]["imageUUID"] == item["imageUUID"]
    assert store.stream_length() == 0 and store.pending() == 0


def test_a_paused_worker_that_comes_back_cannot_record_a_second_result(
    test_cluster: Cluster, store: Store, s3_server: S3Server, cluster_names: ClusterNames, serve: Any
) -> None:
    receiver = serve({"/hook": http_receiver.ok()})
    (a,), workers = test_cluster.start(api=1, workers=2, resize_delay_seconds="2")
    task = upscale(png(), deliveryMethod="async", webhookURL=receiver.url("/hook"))
    assert post(a, [task]).status_code == 200
    holder = wait_until(lambda: store.task(task["taskUUID"]).get("worker"), "a worker to take the task")
    paused = next(worker for worker in workers if worker.name == holder)
    paused.pause()
    try:  # past the dead threshold: the other worker takes the task over and finishes it
        wait_until(lambda: store.task(task["taskUUID"]).get("worker") not in (None, holder), "the takeover")
        first = finished(a, task["taskUUID"])
    finally:
        paused.resume()
    wait_until(lambda: "already finished" in paused.log(), "the paused worker to finish its own run", every=0.2)
    assert poll(a, task["taskUUID"]) == first
    assert store.task(task["taskUUID"])["attempts"] == "2"
    assert len(receiver.wait_for(1)) == 1
    time.sleep(0.5)
    assert len(receiver.requests) == 1  # the late run sent no webhook
    outputs = [key for key in output_objects(s3_server, cluster_names.bucket) if first["imageUUID"] in key]
    assert len(outputs) == 1  # both runs wrote the one output object


def test_a_task_that_crashes_every_worker_fails_after_three_deliveries_and_is_set_aside(
    test_cluster: Cluster, store: Store
) -> None:
    (a,), workers = test_cluster.start(api=1, workers=2, resize_crash_width="13")
    task = upscale(png(13, 9), deliveryMethod="async")
    assert post(a, [task]).status_code == 200
    crashes = 0
    deadline = time.monotonic() + 90
    while poll(a, task["taskUUID"]).get("status") == "processing":
        assert time.monotonic() < deadline, test_cluster.logs()
        for worker in workers:
            assert worker.process is not None
            if worker.process.poll() is not None:
                assert worker.process.returncode == 70
                crashes += 1
                # What a supervisor does. Not waiting for /ready: a restarted worker may reclaim the
                # poison task and crash before it reports ready; the next look counts that crash.
                worker.start(wait=False)
        time.sleep(0.1)
    error = poll(a, task["taskUUID"])
    assert error["code"] == "taskCrashedWorkers" and error["taskUUID"] == task["taskUUID"]
    for worker in workers:  # a crash the loop had not seen yet (the other worker took the task on)
        assert worker.process is not None
        if worker.process.poll() is not None:
            assert worker.process.returncode == 70
            crashes += 1
    assert crashes == 3
    letters = store.dead_letters()
    assert [entry["task"] for entry in letters] == [task["taskUUID"]] and letters[0]["deliveries"] == "3"
    assert store.stream_length() == 0  # nothing loops
    healthy = upscale(png())
    assert post(a, [healthy]).json()["data"][0]["taskUUID"] == healthy["taskUUID"]


def test_an_api_node_killed_during_a_sync_wait_loses_nothing(test_cluster: Cluster, store: Store) -> None:
    (a, b), _ = test_cluster.start(api=2, workers=1, resize_delay_seconds="1.5")
    task = upscale(png())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(post, b, [task])
        wait_until(lambda: store.task(task["taskUUID"]).get("started"), "the worker to start the task")
        b.kill()
        with pytest.raises(httpx.HTTPError):
            reply.result(timeout=30)
    assert finished(a, task["taskUUID"])["status"] == "success"


def test_queued_tasks_complete_after_redis_restarts_from_its_data(
    test_cluster: Cluster, redis_server: RedisServer, store: Store
) -> None:
    (a,) = [test_cluster.add("api", "api-a")]
    tasks = [upscale(png(), deliveryMethod="async") for _ in range(5)]
    for task in tasks:
        assert post(a, [task]).status_code == 200  # acknowledged: durably queued, no worker yet
    redis_server.restart(crash=True)  # SIGKILL, then the same port and data directory
    test_cluster.add("worker", "worker-1")
    for task in tasks:
        assert finished(a, task["taskUUID"])["status"] == "success"
    assert store.stream_length() == 0


def test_a_live_long_task_is_never_taken_from_its_worker(test_cluster: Cluster, store: Store) -> None:
    (a,), _ = test_cluster.start(api=1, workers=2, resize_delay_seconds="4")  # four dead thresholds long
    task = upscale(png(), deliveryMethod="async")
    post(a, [task])
    assert finished(a, task["taskUUID"])["status"] == "success"
    assert store.task(task["taskUUID"])["attempts"] == "1"


# --------------------------------------------------------------------------- conflicts and backpressure


def test_one_task_uuid_sent_to_two_nodes_at_once_is_accepted_once(test_cluster: Cluster) -> None:
    (a, b), _ = test_cluster.start(api=2, workers=1)
    for _ in range(5):
        task = upscale(png(), deliveryMethod="async")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda node, task=task: post(node, [task]), (a, b)))
        statuses = sorted(reply.status_code for reply in replies)
        assert statuses == [200, 409], [reply.text for reply in replies]
        conflict = next(reply for reply in replies if reply.status_code == 409).json()["errors"][0]
        assert conflict["code"] == "conflictTaskUUID"


def test_a_full_queue_is_a_429_on_every_node_until_it_drains(test_cluster: Cluster) -> None:
    nodes = [test_cluster.add("api", name, max_queue="2") for name in ("api-a", "api-b", "api-c")]
    accepted = [upscale(png(), deliveryMethod="async") for _ in range(2)]
    for task, node in zip(accepted, nodes, strict=False):
        assert post(node, [task]).status_code == 200
    for node in nodes:
        refused = post(node, [upscale(png(), deliveryMethod="async")])
        assert refused.status_code == 429 and refused.json()["errors"][0]["code"] == "rateLimitExceeded"
    test_cluster.add("worker", "worker-1")
    for task in accepted:
        assert finished(nodes[0], task["taskUUID"])["status"] == "success"
    assert post(nodes[2], [upscale(png(), deliveryMethod="async")]).status_code == 200


# --------------------------------------------------------------------------- failures of the shared services


def test_a_lost_wake_up_is_covered_by_the_periodic_check(
    test_cluster: Cluster, redis_server: RedisServer, store: Store
) -> None:
    (a,), _ = test_cluster.start(api=1, workers=1, resize_delay_seconds="1.5")
    task = upscale(png())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(post, a, [task])
        wait_until(lambda: store.task(task["taskUUID"]).get("started"), "the worker to start the task")
        killed = store.client.client_kill_filter(_type="pubsub")  # every subscription, the API node's too
        assert killed >= 1
        answer = reply.result(timeout=30)
    assert answer.status_code == 200 and answer.json()["data"][0]["taskUUID"] == task["taskUUID"]


def test_redis_down_mid_operation_is_a_503_then_the_node_recovers(
    test_cluster: Cluster, redis_server: RedisServer
) -> None:
    (a,), _ = test_cluster.start(api=1, workers=1)
    redis_server.kill()
    try:
        down = post(a, [upscale(png(), deliveryMethod="async")], timeout=60)
        assert down.status_code == 503, down.text
        error = down.json()["errors"][0]
        assert error["code"] == "serviceUnavailable" and "Redis" in error["message"]
        ready = httpx.get(a.url + "/ready", timeout=10)
        assert ready.status_code == 503 and "redis" in ready.json()["failing"]
    finally:
        redis_server.restart()
    task = upscale(png())
    assert wait_until(lambda: post(a, [task]).status_code == 200, "the node to reconnect", every=0.5)
    assert "Traceback" not in a.log()


def test_bounded_chaos_every_task_ends_exactly_once(test_cluster: Cluster, store: Store, serve: Any) -> None:
    receiver = serve({"/hook": http_receiver.ok()})
    (a, b), workers = test_cluster.start(api=2, workers=3, resize_delay_seconds="0.4")
    tasks = [upscale(png(), deliveryMethod="async", webhookURL=receiver.url("/hook")) for _ in range(50)]
    for index, task in enumerate(tasks):
        assert post((a, b)[index % 2], [task]).status_code == 200
    chaos = random.Random(11)
    deadline = time.monotonic() + 120
    kills = 0
    while any(poll(a, task["taskUUID"]).get("status") == "processing" for task in tasks):
        assert time.monotonic() < deadline, test_cluster.logs()
        if kills < 6:
            victim = chaos.choice(workers)
            victim.kill()
            kills += 1
            victim.start()
        time.sleep(0.8)
    results = [poll(b, task["taskUUID"]) for task in tasks]
    assert all(result["status"] == "success" for result in results)
    hooks = receiver.wait_for(len(tasks))
    time.sleep(1.0)
    delivered = [json.loads(hook.body)["data"][0]["taskUUID"] for hook in receiver.requests]
    assert sorted(delivered) == sorted(task["taskUUID"] for task in tasks), len(hooks)  # each exactly once
    assert store.stream_length() == 0 and store.pending() == 0  # nothing left queued or running


# --------------------------------------------------------------------------- observability


def test_probes_metrics_and_logs_name_the_cluster(test_cluster: Cluster, store: Store) -> None:
    (a,), (worker,) = test_cluster.start(api=1, workers=1)
    ready = httpx.get(a.url + "/ready", timeout=10).json()
    assert ready["checks"] == {"redis": "reachable", "s3": "reachable"}
    worker_ready = httpx.get(worker.url + "/ready", timeout=10).json()
    assert set(worker_ready["checks"]) == {"model", "worker", "redis", "s3", "heartbeat"}
    task = upscale(png())
    assert post(a, [task]).status_code == 200
    metrics = httpx.get(a.url + "/metrics", timeout=10).text
    for series in (
        "upscale_cluster_queue_waiting 0.0",
        "upscale_cluster_queue_running 0.0",
        "upscale_cluster_queue_oldest_wait_seconds 0.0",
        "upscale_cluster_redeliveries_total 0.0",
        "upscale_cluster_dead_lettered_total 0.0",
        "upscale_cluster_workers_alive 1.0",
    ):
        assert series in metrics
    assert f"api-a upscale_server.cluster.jobs [{task['taskUUID']}]: queued" in a.log()
    assert "worker-1 " in worker.log() and task["taskUUID"] in worker.log()
    assert httpx.get(worker.url + "/v1", timeout=10).status_code in (404, 405)  # a worker serves only probes


def test_a_job_whose_data_is_gone_fails_once_instead_of_looping(
    test_cluster: Cluster, store: Store, cluster_names: ClusterNames
) -> None:
    """A queued task whose job payload vanished (its S3 object deleted by hand, say) ends with an error."""
    (a,), _ = test_cluster.start(api=1, workers=1)
    task_uuid = new_uuid()
    prefix = cluster_names.redis_prefix
    store.client.hset(
        f"{prefix}task:{task_uuid}",
        mapping={
            "type": "imageUpscale",
            "delivery": "async",
            "status": "processing",
            "job": "",
            "job_ref": "x",
            "owner": owner_of(KEY),  # the key's task: getResponse answers only it
        },
    )
    store.client.xadd(f"{prefix}jobs", {"task": task_uuid})
    error = finished(a, task_uuid)
    assert error["code"] == "internalServerError" and "could not be read" in error["message"]
    assert store.task(task_uuid)["attempts"] == "1"
    assert wait_until(lambda: store.stream_length() == 0, "the entry to be acknowledged")

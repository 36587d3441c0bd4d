"""Cluster mode under load: API nodes and workers sharing a real Redis and a real S3 (SeaweedFS) on 127.0.0.1.

Every process runs the resize engine with a fixed service time per task (``UPSCALE_RESIZE_DELAY_SECONDS``,
a sleep standing in for a GPU: the worker is busy, the cores are not) on tiny inputs, so what is measured
is the cluster's own machinery: admission and the job stream, the wake-ups, S3, the API nodes.

1. Throughput with 1, 2 and 4 workers (``UPSCALE_WORKER_CONCURRENCY=1`` each) behind 2 API nodes: clients
   (two per worker, plus two) post sync ``imageUpscale`` tasks with base64 inputs round-robin over the API
   nodes for 1 + 8 s; tasks/s is the count of tasks the workers finished (``finished`` in their hashes) in the
   last 8 s, and the scaling is against linear (target: at least 0.9x).
2. Added latency: p50 and p99 of sync requests from one client sending one task after another, service
   time 0, to the single process (``upscale-server serve``, no Redis) and to a cluster of one API node and
   one worker, alternately (so drift on a shared machine hits both alike). Target: p50 at most 5 ms more.
   The cluster's time is split by the task hash: client to ``created``, to ``started``, to ``finished``,
   to the answer (printed, not tabled).
3. Enqueue-to-start: ``started - created`` from the task hashes in Redis, under the throughput load (where
   it is mostly the wait behind the tasks ahead) and for the one-client run (the dispatch alone).
4. Recovery after a worker kill: 2 workers, a long service time; one async task; its worker is SIGKILLed
   once the task's hash has ``started``; then the time from the kill until another worker starts the task
   (target: ``UPSCALE_WORKER_DEAD_SECONDS`` plus at most 1 s) and until it finishes. Both are read from
   the hash (``started``, ``finished``: the workers' clocks, the same machine's), so polling adds nothing.
   Five kills, a fresh worker replacing each killed one, after a random pause of up to 1 s each.

Every sync answer must be the result; one that says ``processing`` (the request came back before its task
finished) is counted and reported as a row of its own, and left out of the latency figures.
Targets are reported next to the figures, never asserted. Starts its own Redis and S3 (``scripts/setup-services``
provides them) and every process in a temporary folder, and stops them all at the end.

    .venv/bin/python -m bench.bench_cluster [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from PIL import Image

from tests.cluster.nodes import KEY, Cluster, Node, cluster, cluster_env
from tests.support.services import RedisServer, S3Server, weed_executable
from upscale_server.cluster.keys import Keys
from upscale_server.testing import run_test_server
from upscale_server.vocabulary import usable_cores

#: Targets from the issue, reported and never asserted.
SCALING_TARGET = 0.9  # throughput with n workers >= 0.9 x n x throughput with 1
ADDED_P50_TARGET_MS = 5.0  # cluster p50 - single-process p50
RECOVERY_MARGIN_S = 1.0  # a killed worker's task starts again within the dead threshold + this

INPUT_SIDE = 16
FACTOR = 2
REQUEST_TIMEOUT_S = 60.0  # one sync request: a guard, not a measure
MAX_TASKS_PER_CLIENT = 5_000  # bounds every client loop besides its deadline
POLL_INTERVAL_S = 0.005
RECOVERY_GUARD_S = 60.0  # waiting for a task to start, to be taken over or to finish: a guard
RECOVERY_PAUSE_S = 1.0  # before each recovery run, a pause of up to this (see recovery())
RECOVERY_SEED = 20


@dataclass(frozen=True)
class Plan:
    """Everything one run does; ``--quick`` shortens it."""

    workers: tuple[int, ...]
    delay_s: float
    warmup_s: float
    window_s: float
    latency_requests: int
    latency_warmup: int
    dead_s: float
    check_s: float
    recovery_delay_s: float
    recovery_dead_s: float
    recovery_runs: int

    def clients(self, workers: int) -> int:
        """Enough clients that a worker never waits for one: two per worker, plus two."""
        return 2 * workers + 2


FULL = Plan(
    workers=(1, 2, 4),
    delay_s=0.2,
    warmup_s=1.0,
    window_s=8.0,
    latency_requests=200,
    latency_warmup=10,
    dead_s=2.0,
    check_s=0.3,
    recovery_delay_s=5.0,
    recovery_dead_s=2.0,
    recovery_runs=5,
)
QUICK = Plan(
    workers=(1, 2, 4),
    delay_s=0.2,
    warmup_s=0.5,
    window_s=2.0,
    latency_requests=20,
    latency_warmup=3,
    dead_s=2.0,
    check_s=0.3,
    recovery_delay_s=2.0,
    recovery_dead_s=1.0,
    recovery_runs=1,
)


# ----------------------------------------------------------------------------------------- helpers


def input_b64() -> str:
    """A tiny PNG (a gradient, so it is not a single colour), base64 without a data-URI head."""
    pixels = np.zeros((INPUT_SIDE, INPUT_SIDE, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(INPUT_SIDE, dtype=np.uint8)[None, :] * (255 // INPUT_SIDE)
    pixels[..., 1] = np.arange(INPUT_SIDE, dtype=np.uint8)[:, None] * (255 // INPUT_SIDE)
    pixels[..., 2] = 128
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def upscale_body(image: str, task_uuid: str, delivery: str = "sync") -> bytes:
    task = {
        "taskType": "imageUpscale",
        "taskUUID": task_uuid,
        "inputImage": image,
        "upscaleFactor": FACTOR,
        "outputType": "URL",
        "outputFormat": "PNG",
        "deliveryMethod": delivery,
    }
    return json.dumps([task]).encode()


def check_reply(response: httpx.Response, task_uuid: str, *, sync: bool = True) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"task {task_uuid}: HTTP {response.status_code}: {response.text[:500]}")
    reply = response.json()
    data = reply.get("data") or []
    # A sync result: the image (a cluster's reply, read back from the task record, also says "success").
    finished = data and "imageURL" in data[0] and data[0].get("status", "success") == "success"
    if reply.get("errors") or len(data) != 1 or (sync and not finished):
        raise RuntimeError(f"task {task_uuid}: unexpected reply {str(reply)[:500]}")


def sync_reply(response: httpx.Response, task_uuid: str) -> bool:
    """True for a sync request's result; False for an answer that says ``processing`` (the request came
    back before its task finished: counted and reported, the task itself still runs); anything else raises."""
    reply = response.json() if response.status_code == 200 else {}
    data = reply.get("data") or []
    if len(data) == 1 and not reply.get("errors") and data[0].get("status") == "processing":
        return False
    check_reply(response, task_uuid)
    return True


HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); ``q`` in 0..100."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summary_ms(values_s: list[float]) -> dict[str, float]:
    return {
        "count": len(values_s),
        "p50_ms": round(percentile(values_s, 50) * 1000, 2),
        "p99_ms": round(percentile(values_s, 99) * 1000, 2),
        "max_ms": round(max(values_s) * 1000, 2),
    }


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------- machine


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and which of avx2, avx512f and the AMX flags it has (from /proc/cpuinfo)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())  # the first core's
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    wanted = ["avx2", "avx512f", "amx_tile", "amx_bf16", "amx_int8"]
    return model, [flag for flag in wanted if flag in flags]


def machine(redis_url: str) -> dict[str, Any]:
    model, flags = cpu_info()
    with redis.Redis.from_url(redis_url) as client:
        redis_version = str(client.info("server").get("redis_version", "?"))
    weed = subprocess.run([weed_executable(), "version"], capture_output=True, text=True, timeout=30, check=False)
    return {
        "cpu": model,
        "flags": flags,
        "cores": usable_cores(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "python": platform.python_version(),
        "redis": redis_version,
        "seaweedfs": next((word for word in weed.stdout.split() if word[:1].isdigit() and "." in word), "?"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(m: dict[str, Any]) -> str:
    flags = " ".join(m["flags"]) if m["flags"] else "none of avx2/avx512f/amx"
    amx = "" if any(f.startswith("amx") for f in m["flags"]) else ", no AMX"
    return (
        f"{m['cpu']}, {m['cores']} cores (flags: {flags}{amx}), {m['memory_gb']} GB RAM, Python {m['python']}, "
        f"Redis {m['redis']}, SeaweedFS {m['seaweedfs']} (load average {m['load_average_at_start'][0]} at start)"
    )


# ----------------------------------------------------------------------------------------- processes


@dataclass
class Services:
    redis: RedisServer
    s3: S3Server
    folder: Path

    def settings(self, name: str, **extra: str) -> tuple[dict[str, str], Keys]:
        """The shared settings of one cluster with its own Redis prefix and bucket; and its keys."""
        token = uuid.uuid4().hex[:8]
        prefix = f"bench-{name}-{token}:{{u}}:"
        bucket = self.s3.create_bucket(f"bench-{name}-{token}")
        env = cluster_env(
            self.redis.url, self.s3.env(), {"UPSCALE_REDIS_PREFIX": prefix, "UPSCALE_S3_BUCKET": bucket}, **extra
        )
        env["UPSCALE_LOG_LEVEL"] = "warning"  # no access line per request: the log is not what is measured
        return env, Keys(env["UPSCALE_REDIS_PREFIX"])


def start_nodes(running: Cluster, roles: list[tuple[str, str]]) -> list[Node]:
    """Start the processes at once, then wait until every one answers /ready."""
    nodes = [running.add(role, name, wait=False) for role, name in roles]
    for node in nodes:
        node.wait_ready()
    return nodes


@contextlib.contextmanager
def logs_on_failure(running: Cluster) -> Iterator[None]:
    try:
        yield
    except BaseException:
        print(f"--- cluster logs ---\n{running.logs()[-6000:]}", file=sys.stderr)
        raise


def task_fields(client: redis.Redis, keys: Keys, task_uuids: list[str], fields: list[str]) -> list[list[Any]]:
    with client.pipeline(transaction=False) as pipe:
        for task_uuid in task_uuids:
            pipe.hmget(keys.task(task_uuid), fields)
        return list(pipe.execute())


def enqueue_to_start(client: redis.Redis, keys: Keys, task_uuids: list[str]) -> dict[str, Any]:
    """``started - created`` of each task (unix seconds written by the API node and the worker), and how
    many tasks were started more than once."""
    rows = task_fields(client, keys, task_uuids, ["created", "started", "attempts"])
    waits = [float(started) - float(created) for created, started, _ in rows if created and started]
    if len(waits) != len(task_uuids):
        raise RuntimeError(f"only {len(waits)} of {len(task_uuids)} task hashes have created and started")
    return {**summary_ms(waits), "rerun": sum(1 for *_, attempts in rows if int(attempts or 0) > 1)}


# ----------------------------------------------------------------------------------------- 1 + 3: throughput


async def closed_loop(urls: list[str], image: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` clients, each posting one sync task after another, round-robin over ``urls``, for
    ``seconds``. Returns every task sent and how many requests came back with ``processing``."""
    tasks: list[str] = []
    early = 0
    limits = httpx.Limits(max_connections=2 * clients, max_keepalive_connections=2 * clients)
    async with httpx.AsyncClient(headers=HEADERS, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        end = time.monotonic() + seconds

        async def one_client() -> None:
            nonlocal early
            for _ in range(MAX_TASKS_PER_CLIENT):
                if time.monotonic() >= end:
                    return
                task_uuid = str(uuid.uuid4())
                url = urls[len(tasks) % len(urls)]
                tasks.append(task_uuid)
                response = await client.post(url + "/v1", content=upscale_body(image, task_uuid))
                early += not sync_reply(response, task_uuid)

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return {"tasks": tasks, "early_replies": early}


def finish_times(client: redis.Redis, keys: Keys, task_uuids: list[str], timeout_s: float = 60.0) -> list[float]:
    """``finished`` of every task (unix seconds), once each has one (a request answered early leaves its
    task running): bounded in time and in count."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.1) + 1):
        values = [row[0] for row in task_fields(client, keys, task_uuids, ["finished"])]
        if all(values):
            return [float(value) for value in values]
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise RuntimeError(f"{sum(1 for v in values if not v)} of {len(task_uuids)} tasks unfinished after {timeout_s:g} s")


def throughput(services: Services, plan: Plan) -> list[dict[str, Any]]:
    env, keys = services.settings(
        "tp",
        resize_delay_seconds=str(plan.delay_s),
        worker_dead_seconds=str(plan.dead_s),
        cluster_check_seconds=str(plan.check_s),
        worker_concurrency="1",
    )
    image = input_b64()
    rows: list[dict[str, Any]] = []
    folder = services.folder / "throughput"
    folder.mkdir()
    with cluster(folder, env) as running, logs_on_failure(running), redis.Redis.from_url(services.redis.url) as rc:
        apis = start_nodes(running, [("api", "api-a"), ("api", "api-b"), ("worker", "worker-1")])[:2]
        workers = 1
        for count in plan.workers:
            if count > workers:
                start_nodes(running, [("worker", f"worker-{n}") for n in range(workers + 1, count + 1)])
                workers = count
            redeliveries_before = int(rc.hget(keys.stats, "redeliveries") or 0)
            clients = plan.clients(count)
            began = time.time()
            run = asyncio.run(closed_loop([n.url for n in apis], image, clients, plan.warmup_s + plan.window_s))
            # Tasks the workers finished in the window (by the hashes: a request answered early counts nothing).
            window = (began + plan.warmup_s, began + plan.warmup_s + plan.window_s)
            in_window = sum(1 for at in finish_times(rc, keys, run["tasks"]) if window[0] <= at < window[1])
            waits = enqueue_to_start(rc, keys, run["tasks"])
            row = {
                "workers": count,
                "api_nodes": len(apis),
                "clients": clients,
                "tasks": len(run["tasks"]),
                "tasks_in_window": in_window,
                "window_s": plan.window_s,
                "tasks_per_s": round(in_window / plan.window_s, 3),
                "early_replies": run["early_replies"],
                "ideal_tasks_per_s": round(count / plan.delay_s, 3),
                "enqueue_to_start": waits,
                "worker": worker_times(rc, keys, run["tasks"], plan.delay_s),
                "redeliveries": int(rc.hget(keys.stats, "redeliveries") or 0) - redeliveries_before,
            }
            base = rows[0]["tasks_per_s"] if rows else row["tasks_per_s"]
            row["vs_linear"] = round(row["tasks_per_s"] / (count * base), 3) if base else 0.0
            if rows:
                previous = rows[-1]
                added = count - previous["workers"]
                gain = (row["tasks_per_s"] - previous["tasks_per_s"]) / (added * base) if base and added else 0.0
                row["per_added_worker"] = round(gain, 3)
            rows.append(row)
            emit({"throughput": row})
    return rows


def worker_times(client: redis.Redis, keys: Keys, task_uuids: list[str], delay_s: float) -> dict[str, Any]:
    """Per task, the worker's time beyond the service time (``finished - started - delay``: loading the
    job, storing the output, recording); per worker, the gap from one task's ``finished`` to its next
    ``started`` (acknowledging, reading the stream, loading the hash). Medians in ms."""
    rows = task_fields(client, keys, task_uuids, ["worker", "started", "finished"])
    beyond: list[float] = []
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for worker, started, finished in rows:
        if worker and started and finished:
            beyond.append(float(finished) - float(started) - delay_s)
            name = worker.decode() if isinstance(worker, bytes) else str(worker)
            by_worker.setdefault(name, []).append((float(started), float(finished)))
    gaps: list[float] = []
    for spans in by_worker.values():
        spans.sort()
        gaps += [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(spans)]
    return {
        "beyond_delay_p50_ms": round(percentile(beyond, 50) * 1000, 2) if beyond else None,
        "turnaround_p50_ms": round(percentile(gaps, 50) * 1000, 2) if gaps else None,
        "tasks_by_worker": {name: len(spans) for name, spans in sorted(by_worker.items())},
    }


# ----------------------------------------------------------------------------------------- 2: added latency


def added_latency(services: Services, plan: Plan) -> dict[str, Any]:
    """One client, one sync task after another (service time 0), alternately to the single process and
    to a cluster of one API node and one worker."""
    env, keys = services.settings(
        "lat", worker_dead_seconds=str(plan.dead_s), cluster_check_seconds=str(plan.check_s), worker_concurrency="1"
    )
    single_env = {"UPSCALE_LOG_LEVEL": "warning", "UPSCALE_OUTBOUND_ALLOW": '["127.0.0.1"]', "OMP_NUM_THREADS": "1"}
    image = input_b64()
    folder = services.folder / "latency"
    folder.mkdir()
    with (
        run_test_server(data_dir=folder / "single", api_key=KEY, env=single_env) as single,
        cluster(folder, env) as running,
        logs_on_failure(running),
        redis.Redis.from_url(services.redis.url) as rc,
    ):
        api = start_nodes(running, [("api", "api-a"), ("worker", "worker-1")])[0]
        targets = {"single": single.url, "cluster": api.url}
        times: dict[str, list[float]] = {name: [] for name in targets}
        early = 0  # answers that said processing: left out of the figures
        cluster_tasks: list[tuple[str, float, float]] = []  # task, sent and answered (unix seconds)
        with httpx.Client(headers=HEADERS, timeout=REQUEST_TIMEOUT_S) as client:
            for n in range(plan.latency_warmup + plan.latency_requests):
                for name, url in targets.items():
                    task_uuid = str(uuid.uuid4())
                    body = upscale_body(image, task_uuid)
                    sent_at, began = time.time(), time.perf_counter()
                    response = client.post(url + "/v1", content=body)
                    elapsed = time.perf_counter() - began
                    if not sync_reply(response, task_uuid):
                        early += 1
                        continue
                    if n >= plan.latency_warmup:
                        times[name].append(elapsed)
                        if name == "cluster":
                            cluster_tasks.append((task_uuid, sent_at, sent_at + elapsed))
        waits = enqueue_to_start(rc, keys, [task for task, _, _ in cluster_tasks])
        phases = cluster_phases(rc, keys, cluster_tasks)
    result = {name: summary_ms(values) for name, values in times.items()}
    result["added_p50_ms"] = round(result["cluster"]["p50_ms"] - result["single"]["p50_ms"], 2)
    result["added_p99_ms"] = round(result["cluster"]["p99_ms"] - result["single"]["p99_ms"], 2)
    result["enqueue_to_start"] = waits
    result["early_replies"] = early
    result["cluster_requests"] = plan.latency_warmup + plan.latency_requests
    result["cluster_phases_p50_ms"] = phases
    emit({"latency": result})
    return result


def cluster_phases(client: redis.Redis, keys: Keys, tasks: list[tuple[str, float, float]]) -> dict[str, float]:
    """Where a cluster request's time goes, medians in ms: sent to ``created`` (the API node reads and
    enqueues), ``created`` to ``started``, ``started`` to ``finished`` (the worker: load, upscale, store,
    record) and ``finished`` to answered (the wake-up, the API node reads the record back and replies)."""
    rows = task_fields(client, keys, [task for task, _, _ in tasks], ["created", "started", "finished"])
    spans: dict[str, list[float]] = {"intake": [], "dispatch": [], "worker": [], "reply": []}
    for (_, sent, answered), (created, started, finished) in zip(tasks, rows, strict=True):
        created_s, started_s, finished_s = float(created), float(started), float(finished)
        spans["intake"].append(created_s - sent)
        spans["dispatch"].append(started_s - created_s)
        spans["worker"].append(finished_s - started_s)
        spans["reply"].append(answered - finished_s)
    return {name: round(percentile(values, 50) * 1000, 2) for name, values in spans.items()}


# ----------------------------------------------------------------------------------------- 4: recovery


def wait_for(check: Any, what: str, timeout_s: float = RECOVERY_GUARD_S) -> Any:
    """Poll ``check()`` until it returns something truthy; bounded in time and in count."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / POLL_INTERVAL_S) + 1):
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    raise RuntimeError(f"{what}: not within {timeout_s:g} s")


def recovery(services: Services, plan: Plan) -> dict[str, Any]:
    """``plan.recovery_runs`` kills, each of the worker running the one task; a fresh worker replaces the
    killed one before the next run, so there are always two."""
    env, keys = services.settings(
        "rec",
        resize_delay_seconds=str(plan.recovery_delay_s),
        worker_dead_seconds=str(plan.recovery_dead_s),
        cluster_check_seconds=str(plan.check_s),
        worker_concurrency="1",
    )
    folder = services.folder / "recovery"
    folder.mkdir()
    runs: list[dict[str, Any]] = []
    with (
        cluster(folder, env) as running,
        logs_on_failure(running),
        redis.Redis.from_url(services.redis.url, decode_responses=True) as rc,
    ):
        api, *workers = start_nodes(running, [("api", "api-a"), ("worker", "worker-1"), ("worker", "worker-2")])
        pauses = random.Random(RECOVERY_SEED)
        for n in range(plan.recovery_runs):
            if n:
                started = sum(1 for node in running.nodes if node.role == "worker")
                workers += start_nodes(running, [("worker", f"worker-{started + 1}")])  # a new name
            # An idle worker looks for abandoned jobs between blocking reads of up to a second: without a
            # pause, the kill would always fall at the same point of that loop (just after a worker starts).
            time.sleep(pauses.uniform(0, RECOVERY_PAUSE_S))
            run = kill_one(api, workers, rc, keys, input_b64())
            workers = [node for node in workers if node.name != run["killed"]]
            runs.append(run)
            emit({"recovery": run})
    restart = [run["kill_to_restart_s"] for run in runs]
    finish = [run["kill_to_finish_s"] for run in runs]
    return {
        "dead_s": plan.recovery_dead_s,
        "delay_s": plan.recovery_delay_s,
        "runs": runs,
        "kill_to_restart_s": {"p50": round(percentile(restart, 50), 3), "max": max(restart)},
        "kill_to_finish_s": {"p50": round(percentile(finish, 50), 3), "max": max(finish)},
        "restart_target_s": plan.recovery_dead_s + RECOVERY_MARGIN_S,
    }


def kill_one(api: Node, workers: list[Node], rc: redis.Redis, keys: Keys, image: str) -> dict[str, Any]:
    """One async task; SIGKILL its worker as soon as the hash says it started; the times from the kill
    until the task's ``started`` changes (another worker took it) and until it has ``finished``."""
    task_uuid = str(uuid.uuid4())
    key = keys.task(task_uuid)
    response = httpx.post(api.url + "/v1", content=upscale_body(image, task_uuid, "async"), headers=HEADERS, timeout=30)
    check_reply(response, task_uuid, sync=False)

    def started() -> list[str] | None:
        fields = rc.hmget(key, ["started", "worker"])
        return fields if all(fields) else None

    first = wait_for(started, "started")
    victim = next(node for node in workers if node.name == first[1])
    killed_at = time.time()
    victim.kill()
    again = wait_for(lambda: (s := rc.hget(key, "started")) != first[0] and s, "taken over")
    finished = wait_for(lambda: rc.hget(key, "finished"), "finished")
    record = rc.hgetall(key)
    if record.get("status") != "success":
        raise RuntimeError(f"the task ended {record.get('status')!r} after the kill: {record}")
    return {
        "killed": victim.name,
        "taken_over_by": record.get("worker"),
        "attempts": int(record.get("attempts", 0)),
        "ran_before_kill_s": round(killed_at - float(first[0]), 3),
        "kill_to_restart_s": round(float(again) - killed_at, 3),
        "kill_to_finish_s": round(float(finished) - killed_at, 3),
    }


# ----------------------------------------------------------------------------------------- report


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def markdown(result: dict[str, Any]) -> str:
    """The table ready to paste into docs/benchmarks.md, headed by the command, the machine and the settings."""
    s = result["settings"]
    elsewhere = "" if s["recovery_dead_s"] == s["dead_s"] else f" (elsewhere {s['dead_s']:g})"
    lines = [
        f"`{result['command']}` on {machine_line(result['machine'])}.",
        "",
        f"Settings: `UPSCALE_ENGINE=resize`, `UPSCALE_WORKER_CONCURRENCY=1`; throughput: 2 API nodes, "
        f"`UPSCALE_RESIZE_DELAY_SECONDS={s['delay_s']:g}`, clients = 2 per worker + 2, {s['window_s']:g} s window "
        f"after {s['warmup_s']:g} s; latency: 1 client, delay 0, {s['latency_requests']} requests to each after "
        f"{s['latency_warmup']} warm-up; recovery: 2 workers, delay {s['recovery_delay_s']:g} s, one async task per "
        f"kill, {s['recovery_runs']} kill(s), "
        f"`UPSCALE_WORKER_DEAD_SECONDS={s['recovery_dead_s']:g}`{elsewhere}, "
        f"`UPSCALE_CLUSTER_CHECK_SECONDS={s['check_s']:g}`; input {s['input']}, sync REST, output URL PNG.",
        "",
        "| measure | configuration | p50 or value | p99 or max | target |",
        "|---|---|---|---|---|",
    ]
    for row in result["throughput"]:
        config = f"{row['workers']} worker{'s' if row['workers'] > 1 else ''}, {row['clients']} clients"
        value = f"{row['tasks_per_s']:.2f} tasks/s (ideal {row['ideal_tasks_per_s']:g})"
        if row["workers"] == result["throughput"][0]["workers"]:
            target = "-"
        else:
            value += f"; {row['vs_linear']:.2f}x linear, {row['per_added_worker']:.2f} per added worker"
            target = f">= {SCALING_TARGET:g}x linear ({verdict(row['vs_linear'] >= SCALING_TARGET)})"
        lines.append(f"| throughput | {config} | {value} | - | {target} |")
    for row in result["throughput"]:
        e = row["enqueue_to_start"]
        config = f"{row['workers']} worker{'s' if row['workers'] > 1 else ''}, {row['clients']} clients"
        # In a closed loop every client not being served waits in the queue: Little's law gives that wait.
        queueing = (row["clients"] - row["workers"]) / row["tasks_per_s"] * 1000 if row["tasks_per_s"] else 0.0
        lines.append(
            f"| enqueue-to-start under load | {config} | {e['p50_ms']} ms | {e['p99_ms']} ms | "
            f"- (Little's law, {row['clients'] - row['workers']} queued: {queueing:.0f} ms) |"
        )
    lat = result["latency"]
    n = lat["single"]["count"]
    lines += [
        f"| sync latency, 1 client | single process | {lat['single']['p50_ms']} ms | {lat['single']['p99_ms']} ms "
        f"| - |",
        f"| sync latency, 1 client | cluster: 1 API node, 1 worker | {lat['cluster']['p50_ms']} ms | "
        f"{lat['cluster']['p99_ms']} ms | - |",
        f"| added latency (cluster - single) | {n} requests each, alternately | {lat['added_p50_ms']} ms | "
        f"{lat['added_p99_ms']} ms | p50 <= {ADDED_P50_TARGET_MS:g} ms "
        f"({verdict(lat['added_p50_ms'] <= ADDED_P50_TARGET_MS)}) |",
        f"| enqueue-to-start, 1 client | cluster: 1 API node, 1 worker | {lat['enqueue_to_start']['p50_ms']} ms | "
        f"{lat['enqueue_to_start']['p99_ms']} ms | - |",
    ]
    early = lat["early_replies"] + sum(row["early_replies"] for row in result["throughput"])
    requests = lat["cluster_requests"] + sum(row["tasks"] for row in result["throughput"])
    lines.append(
        f"| sync replies saying processing, no result | every sync request to a cluster above | {early} of "
        f"{requests} | - | 0 ({verdict(early == 0)}) |"
    )
    r = result["recovery"]
    kills = f"{len(r['runs'])} kill{'s' if len(r['runs']) > 1 else ''}"
    config = f"2 workers, dead {r['dead_s']:g} s, delay {r['delay_s']:g} s, {kills}"
    restart, finish = r["kill_to_restart_s"], r["kill_to_finish_s"]
    lines += [
        f"| recovery: kill to started again | {config} | {restart['p50']:.2f} s | max {restart['max']:.2f} s | "
        f"<= {r['restart_target_s']:g} s: dead + {RECOVERY_MARGIN_S:g} s, every kill "
        f"({verdict(restart['max'] <= r['restart_target_s'])}) |",
        f"| recovery: kill to finished | {config} | {finish['p50']:.2f} s | max {finish['max']:.2f} s | "
        f"- (the service time after the restart: {r['delay_s']:g} s) |",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute): a smoke test")
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    command = " ".join(["python -m bench.bench_cluster", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp,
        RedisServer(Path(tmp) / "redis") as redis_server,
        S3Server(Path(tmp) / "s3") as s3_server,
    ):
        services = Services(redis_server, s3_server, Path(tmp))
        info = machine(redis_server.url)
        emit({"machine": info})
        latency = added_latency(services, plan)
        rows = throughput(services, plan)
        rec = recovery(services, plan)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    settings = {
        "delay_s": plan.delay_s,
        "warmup_s": plan.warmup_s,
        "window_s": plan.window_s,
        "latency_requests": plan.latency_requests,
        "latency_warmup": plan.latency_warmup,
        "dead_s": plan.dead_s,
        "check_s": plan.check_s,
        "recovery_delay_s": plan.recovery_delay_s,
        "recovery_dead_s": plan.recovery_dead_s,
        "recovery_runs": plan.recovery_runs,
        "input": f"{INPUT_SIDE}x{INPUT_SIDE} PNG, factor {FACTOR}",
    }
    result = {
        "command": command,
        "machine": info,
        "settings": settings,
        "throughput": rows,
        "latency": latency,
        "recovery": rec,
    }
    table = markdown(result)
    print(f"\n(total {time.monotonic() - began:.0f} s)\n\n{table}", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()

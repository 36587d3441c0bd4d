"""The cluster harness itself: the Redis and S3 servers are real, durable, locked and stopped for good.

What the cluster tests build on, checked once: Redis answers and keeps an acknowledged stream across a
clean restart and across a crash (its append-only file is fsynced at every write); S3 stores and
returns bytes exactly, and refuses a request signed with the wrong secret, with an unknown key or with
none; a stopped server leaves no process and no listening port behind.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import httpx
import psutil
import pytest
import redis

from tests.cluster.conftest import ClusterNames
from tests.support.services import ACCESS_KEY, SECRET_KEY, RedisServer, S3Server, ServiceError


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_server.url, socket_timeout=5) as client:
        yield client


def gone(pid: int) -> bool:
    """No process ``pid`` any more (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --- Redis --------------------------------------------------------------------------------------------


def test_redis_answers_on_its_own_port_with_every_write_fsynced(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_client.ping() is True
    config = redis_client.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "always"
    assert config["save"] == ""  # no snapshots: the AOF alone is what a restart reads
    assert config["bind"] == "127.0.0.1"
    assert Path(str(config["dir"])) == redis_server.data_dir
    assert psutil.Process(redis_server.pid).name() == "redis-server"


def test_a_stream_survives_a_clean_restart(
    redis_server: RedisServer, redis_client: redis.Redis, cluster_names: ClusterNames
) -> None:
    stream = f"{cluster_names.redis_prefix}jobs"
    ids = [redis_client.xadd(stream, {"task": f"task-{n}", "payload": bytes([n, 0, 255])}) for n in range(3)]
    before: Any = redis_client.xrange(stream)  # redis-py types a reply as any of the protocols' shapes
    old_pid, port = redis_server.pid, redis_server.port

    redis_server.restart()

    assert gone(old_pid)
    assert redis_server.pid != old_pid and redis_server.port == port
    assert redis_client.xrange(stream) == before  # the client reconnects to the same URL
    assert [entry_id for entry_id, _ in before] == ids
    assert before[1][1] == {b"task": b"task-1", b"payload": bytes([1, 0, 255])}


def test_a_stream_survives_a_crash(
    redis_server: RedisServer, redis_client: redis.Redis, cluster_names: ClusterNames
) -> None:
    stream = f"{cluster_names.redis_prefix}jobs"
    for n in range(5):
        redis_client.xadd(stream, {"task": f"task-{n}"})
    redis_client.xgroup_create(stream, "workers", id="0")
    claimed: Any = redis_client.xreadgroup("workers", "worker-1", {stream: ">"}, count=2)
    before = redis_client.xrange(stream)
    old_pid = redis_server.pid

    redis_server.kill()  # SIGKILL: no shutdown, nothing flushed on the way out

    assert gone(old_pid)
    assert not redis_server.running
    with pytest.raises(redis.ConnectionError):
        redis_client.ping()

    redis_server.restart()

    assert redis_client.xrange(stream) == before
    assert len(claimed[0][1]) == 2
    pending = redis_client.xpending(stream, "workers")
    assert pending["pending"] == 2  # the consumer group and its unacknowledged claims are there too
    assert [consumer["name"] for consumer in pending["consumers"]] == [b"worker-1"]


def test_redis_start_failure_shows_the_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(tmp_path / "redis", port=taken.getsockname()[1])
        with pytest.raises(ServiceError, match=r"(?s)exited while starting.*Address already in use"):
            server.start(timeout=10)
    assert not server.running


# --- S3 -----------------------------------------------------------------------------------------------


def test_s3_settings_point_at_the_endpoint(s3_server: S3Server) -> None:
    assert s3_server.endpoint == f"http://127.0.0.1:{s3_server.port}"
    assert s3_server.env() == {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "UPSCALE_S3_ENDPOINT": s3_server.endpoint,
        "UPSCALE_S3_REGION": "us-east-1",
    }
    ports = {conn.laddr.port: conn.laddr.ip for conn in psutil.Process(s3_server.pid).net_connections("tcp")}
    assert s3_server.port in ports
    assert set(ports.values()) == {"127.0.0.1"}  # every port weed opened, on loopback only


def test_s3_round_trip_of_bytes(s3_server: S3Server, cluster_names: ClusterNames) -> None:
    client = s3_server.client()
    assert client.list_objects_v2(Bucket=cluster_names.bucket).get("KeyCount") == 0  # a bucket of its own
    body = bytes(range(256)) * 4096  # 1 MiB, every byte value
    client.put_object(Bucket=cluster_names.bucket, Key="images/a b/ü.png", Body=body, ContentType="image/png")

    got = client.get_object(Bucket=cluster_names.bucket, Key="images/a b/ü.png")

    assert got["Body"].read() == body
    assert got["ContentType"] == "image/png"
    listed = client.list_objects_v2(Bucket=cluster_names.bucket)["Contents"]
    assert [(item["Key"], item["Size"]) for item in listed] == [("images/a b/ü.png", len(body))]


def test_s3_refuses_wrong_credentials(s3_server: S3Server, cluster_names: ClusterNames) -> None:
    s3_server.client().put_object(Bucket=cluster_names.bucket, Key="secret.png", Body=b"data")

    wrong_secret = s3_server.client(secret_key="not-the-secret")
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        wrong_secret.get_object(Bucket=cluster_names.bucket, Key="secret.png")
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(botocore.exceptions.ClientError):
        wrong_secret.put_object(Bucket=cluster_names.bucket, Key="other.png", Body=b"data")

    unknown_key = s3_server.client(access_key="someone-else")
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        unknown_key.list_buckets()
    assert refused.value.response["Error"]["Code"] == "InvalidAccessKeyId"

    anonymous = httpx.get(f"{s3_server.endpoint}/{cluster_names.bucket}/secret.png", timeout=10)
    assert anonymous.status_code == 403

    listed = s3_server.client().list_objects_v2(Bucket=cluster_names.bucket)["Contents"]
    assert [item["Key"] for item in listed] == ["secret.png"]  # nothing was written by the refused put


def test_s3_has_no_bucket_it_was_not_asked_for(s3_server: S3Server, cluster_names: ClusterNames) -> None:
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        s3_server.client().put_object(Bucket=f"{cluster_names.bucket}-missing", Key="a.png", Body=b"data")
    assert refused.value.response["Error"]["Code"] == "NoSuchBucket"


# --- stopping -----------------------------------------------------------------------------------------


def test_stopped_servers_leave_no_process_and_no_port(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    s3_server = S3Server(tmp_path / "s3").start()
    redis_pid, s3_pid = redis_server.pid, s3_server.pid
    s3_ports = [conn.laddr.port for conn in psutil.Process(s3_pid).net_connections("tcp")]
    assert listening(redis_server.port) and len(s3_ports) >= 8

    redis_server.stop()
    s3_server.stop()

    assert gone(redis_pid) and gone(s3_pid)
    assert not redis_server.running and not s3_server.running
    assert not any(listening(port) for port in [redis_server.port, *s3_ports])
    redis_server.stop()  # stopping again does nothing
    s3_server.stop()

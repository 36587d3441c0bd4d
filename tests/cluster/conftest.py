"""The cluster harness: a real Redis and a real S3 (SeaweedFS) for the whole session, on free 127.0.0.1 ports.

``redis_server`` and ``s3_server`` are started once per session (``tests/support/services.py``), in a
temp folder of their own, and stopped by PID at its end; together they start in about a second.
Tests share them, never their data: ``cluster_names`` gives each test its own Redis key prefix and its
own (created, empty) bucket, and removes both afterwards.

A test may stop, kill or restart ``redis_server`` (it comes back on the same port and data dir); if it
leaves it down, the next test finds it started again. The root ``conftest.py`` marks every test here
``e2e``: they start processes, so ``scripts/test --fast`` leaves them out and CI runs them (the servers
come from ``scripts/setup-services``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.cluster.nodes import Cluster
from tests.support.services import RedisServer, S3Server


@dataclass(frozen=True)
class ClusterNames:
    """One test's own corner of the shared servers."""

    #: Prefix of every Redis key the test writes, e.g. ``t1a2b3c4d5e6f:{u}:`` (a hash tag, as in production).
    redis_prefix: str
    #: A bucket created for the test, empty at its start.
    bucket: str

    def env(self) -> dict[str, str]:
        """The server settings that point a node at these names."""
        return {"UPSCALE_REDIS_PREFIX": self.redis_prefix, "UPSCALE_S3_BUCKET": self.bucket}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis for the session: AOF on, fsynced at every write; ``restart()`` keeps its port and data."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3 endpoint for the session that requires the credentials in ``s3_server.env()``."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def cluster_names(redis_server: RedisServer, s3_server: S3Server) -> Iterator[ClusterNames]:
    """A Redis key prefix and a bucket no other test uses; the keys and the bucket are deleted afterwards."""
    token = uuid.uuid4().hex[:12]
    names = ClusterNames(redis_prefix=f"t{token}:{{u}}:", bucket=s3_server.create_bucket(f"t-{token}"))
    yield names
    if not redis_server.running:  # the test stopped or killed it and did not bring it back
        redis_server.start()
    with redis.Redis.from_url(redis_server.url) as client:
        keys = list(client.scan_iter(match=f"{names.redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    s3_server.delete_bucket(names.bucket)


@pytest.fixture
def cluster_settings(redis_server: RedisServer, s3_server: S3Server, cluster_names: ClusterNames) -> dict[str, str]:
    """What every process of this test's cluster shares (the test may add to it before starting them)."""
    from tests.cluster.nodes import cluster_env

    return cluster_env(redis_server.url, s3_server.env(), cluster_names.env())


@pytest.fixture
def test_cluster(tmp_path: Path, cluster_settings: dict[str, str]) -> Iterator[Cluster]:
    """An empty cluster: the test adds API nodes and workers; every process is stopped afterwards."""
    from tests.cluster.nodes import cluster

    with cluster(tmp_path, cluster_settings) as running:
        yield running

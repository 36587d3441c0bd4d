"""The in-process API tests against a two-node cluster (``pytest --cluster``; ``scripts/test`` runs it once).

With ``--cluster`` the API tests' settings (:func:`tests.api_helpers.resize_settings`) point at a real
Redis and S3 started for the session, and :func:`tests.api_helpers.api_client` gives a
:class:`TwoNodeClient`: two apps on the same Redis prefix and bucket, each an API node that also runs
jobs, with the test's requests and sockets alternating between them. A test then passes only if what it
checks holds whichever node takes each call. A test's corner of the shared servers is named after its
data folder, so two apps built on one folder (a restart) share their state as they would on one disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from upscale_server.app import create_app
from upscale_server.config import Settings


@dataclass(frozen=True)
class ClusterTarget:
    redis_url: str
    bucket: str

    def settings_for(self, data_dir: Path) -> dict[str, Any]:
        """The cluster settings of an app built on ``data_dir``: a key prefix of its own, one bucket."""
        token = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
        return {
            "redis_url": self.redis_url,
            "redis_prefix": f"a{token}:{{u}}:",
            "s3_bucket": self.bucket,
            "s3_prefix": f"{token}/",
            "cluster_check_seconds": 0.2,
        }


#: Set for the session by tests/conftest.py when pytest runs with --cluster.
TARGET: ClusterTarget | None = None


#: The TestClient methods that make a request; each call takes the next node.
ROUTED = frozenset({"request", "get", "post", "head", "put", "patch", "delete", "options", "websocket_connect"})


class TwoNodeClient:
    """Two API nodes of one cluster behind one client: each call goes to the next node in turn."""

    def __init__(self, settings: Settings) -> None:
        self._clients = [
            TestClient(create_app(settings.model_copy(update={"node_id": f"node-{name}"}))) for name in ("a", "b")
        ]
        self._turn = itertools.cycle(self._clients)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TwoNodeClient:
        for client in self._clients:
            self._stack.enter_context(client)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def app(self) -> Any:
        return self._clients[0].app

    def __getattr__(self, name: str) -> Any:
        """Each request method (``get``, ``post``, ``websocket_connect``...) goes to the next node in turn."""
        if name not in ROUTED:
            raise AttributeError(name)
        return getattr(next(self._turn), name)


@contextlib.contextmanager
def cluster_target(folder: Path) -> Iterator[ClusterTarget]:
    """A real Redis and S3 for the session, and the AWS variables boto3 reads pointed at it."""
    from tests.support.services import RedisServer, S3Server

    global TARGET  # noqa: PLW0603 - one target per session, read by the API helpers
    with RedisServer(folder / "redis") as redis_server, S3Server(folder / "s3") as s3_server:
        saved = dict(os.environ)
        os.environ.update(s3_server.env())
        TARGET = ClusterTarget(redis_server.url, s3_server.create_bucket("api-suite"))
        try:
            yield TARGET
        finally:
            TARGET = None
            os.environ.clear()
            os.environ.update(saved)


def skip_local_only(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="about the single process itself (local_only); this run is against a cluster")
    for item in items:
        if item.get_closest_marker("local_only") is not None:
            item.add_marker(skip)

"""API node and worker processes of a test cluster, each a real ``upscale-server`` process.

Every process runs the resize engine (no weights) with short claim timings, so a kill lands mid-task and
is noticed in about a second. :class:`Cluster` starts and stops them by PID; a test kills, pauses and
restarts them to prove what the cluster promises.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.services import free_port

KEY = "cluster-test-key"
#: Seconds a process may take to answer /ready (a guard, not a measure: it takes about two).
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

#: Claim and check timings short enough for tests: a dead worker is noticed after about 1 s.
FAST_TIMINGS = {
    "UPSCALE_WORKER_DEAD_SECONDS": "1.0",
    "UPSCALE_CLUSTER_CHECK_SECONDS": "0.3",
}


@dataclass
class Node:
    """One process: ``role`` is ``api`` or ``worker``; ``url`` its HTTP address (probes, and the API)."""

    name: str
    role: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, *, wait: bool = True) -> Node:
        command = ["serve", "--role", "api"] if self.role == "api" else ["worker"]
        argv = [sys.executable, "-m", "upscale_server", *command, "--port", str(self.port)]
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:g} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    """API nodes and workers sharing one Redis prefix and one bucket."""

    def __init__(self, folder: Path, env: Mapping[str, str]) -> None:
        self.folder = folder
        self.env = dict(env)
        self.nodes: list[Node] = []

    def add(self, role: str, name: str, *, wait: bool = True, **settings: str) -> Node:
        """Start one more process (and wait until it is ready unless ``wait`` is False); ``settings`` are
        its own ``UPSCALE_*`` settings, lower case without the prefix."""
        env = {
            **os.environ,
            **self.env,
            **{f"UPSCALE_{key.upper()}": value for key, value in settings.items()},
            "UPSCALE_NODE_ID": name,
        }
        node = Node(name, role, free_port(), env, self.folder / f"{name}.log")
        self.nodes.append(node)
        return node.start(wait=wait)

    def start(self, api: int, workers: int, **settings: str) -> tuple[list[Node], list[Node]]:
        """``api`` nodes (api-a, api-b, ...) and ``workers`` (worker-1, ...), started together."""
        apis = [self.add("api", f"api-{chr(ord('a') + i)}", wait=False, **settings) for i in range(api)]
        workers_ = [self.add("worker", f"worker-{i + 1}", wait=False, **settings) for i in range(workers)]
        for node in [*apis, *workers_]:
            node.wait_ready()
        return apis, workers_

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {node.name}\n{node.log_tail(80)}" for node in self.nodes)


@contextlib.contextmanager
def cluster(folder: Path, env: Mapping[str, str]) -> Iterator[Cluster]:
    running = Cluster(folder, env)
    try:
        yield running
    finally:
        running.stop()


def cluster_env(
    redis_url: str, s3_env: Mapping[str, str], names_env: Mapping[str, str], **extra: str
) -> dict[str, str]:
    """The settings every process of a test cluster shares."""
    return {
        **s3_env,
        **names_env,
        **FAST_TIMINGS,
        "UPSCALE_REDIS_URL": redis_url,
        "UPSCALE_ENGINE": "resize",
        "UPSCALE_API_KEYS": f'["{KEY}"]',
        "UPSCALE_LOG_LEVEL": "info",
        "UPSCALE_OUTBOUND_ALLOW": '["127.0.0.1"]',
        "OMP_NUM_THREADS": "1",
        **{f"UPSCALE_{key.upper()}": value for key, value in extra.items()},
    }

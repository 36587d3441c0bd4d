"""A test-target server for pipelines that test their Runware integration: a pytest plugin and a context manager.

``run_test_server()`` starts ``python -m upscale_server serve`` in its own process in test-target mode
(``UPSCALE_ENGINE=resize``: the network is swapped for a deterministic Lanczos resize, everything
else is the real server), on a free 127.0.0.1 port, with a temporary data folder, an empty models
folder and a random API key; it waits until the server is ready (``/ready``), yields an :class:`UpscaleTestServer`
(``url``, ``rest_url``, ``ws_url``, ``api_key``) and stops it afterwards (SIGTERM, then kill).

As a pytest plugin (``pytest -p upscale_server.testing``, or automatically once the package's ``pytest11``
entry point is installed) it provides the session fixture ``upscale_server``::

    def test_upscale(upscale_server):
        client = Runware(api_key=upscale_server.api_key, transport="rest",
                         http_base_url=upscale_server.rest_url)

Why a real process and not an in-process app: the code under test talks to a URL through an SDK, as
in production; a subprocess gives it exactly that, with the real HTTP and WebSocket stack (the moto
server-mode pattern). This module imports nothing but the standard library (and pytest, when pytest
loads it), so it can run in a test environment that does not have the server's dependencies: set
``UPSCALE_TEST_SERVER_PYTHON`` to an interpreter that has them (see docs/test-target.md).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

#: Environment variable naming the Python interpreter that runs the server (default: this one).
PYTHON_ENV = "UPSCALE_TEST_SERVER_PYTHON"
#: Seconds to wait for the server to answer before giving up (importing torch dominates).
DEFAULT_STARTUP_TIMEOUT = 60.0
#: Seconds between SIGTERM and SIGKILL; the server drains running tasks first, tests have none left.
STOP_TIMEOUT = 15.0
#: A free port is picked, released, then bound by the server: another process may take it in between.
_PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class UpscaleTestServer:
    """A running test-target server. Point an SDK at ``rest_url`` or ``ws_url`` with ``api_key``."""

    url: str  # http://127.0.0.1:PORT (images are served under it)
    rest_url: str  # http://127.0.0.1:PORT/v1
    ws_url: str  # ws://127.0.0.1:PORT/v1
    api_key: str
    port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        """Everything the server printed so far (handy in a failing test's message)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


class ServerStartError(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _source_root() -> Path | None:
    """The source root holding this ``upscale_server`` package when it is a checkout, else None.

    The server runs with the temp folder as its working directory (so nothing in the caller's
    project can shadow this package) and this folder first on ``PYTHONPATH`` (so the server
    is the very code this plugin came from, installed or not). An installed package is found by its
    interpreter anyway, and another interpreter must not import from this one's site-packages.
    """
    root = Path(__file__).resolve().parent.parent
    return None if root.name in ("site-packages", "dist-packages") else root


def _server_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    root = _source_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env["UPSCALE_ENGINE"] = "resize"
    env.update(extra or {})
    return env


def _ready(base_url: str) -> bool:
    """True once ``GET /ready`` answers 200: the default model (here the resize engine) is loaded, the
    worker runs and the data folder is writable. A 404 is a server from before ``/ready``: answering
    at all is then the best sign there is."""
    try:
        with urllib.request.urlopen(f"{base_url}/ready", timeout=1):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code == 404
    except OSError:
        return False


def stop_server(server: UpscaleTestServer, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM (the server finishes what it is doing and exits), then SIGKILL after ``timeout``."""
    process = server.process
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _start(
    python: str,
    *,
    data_dir: Path,
    models_dir: Path,
    api_key: str,
    port: int,
    env: dict[str, str],
    startup_timeout: float,
) -> UpscaleTestServer:
    log_path = data_dir / "server.log"
    command = [
        python, "-m", "upscale_server", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data_dir), "--models-dir", str(models_dir),
        "--api-key", api_key, "--device", "cpu",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir)
    base = f"http://127.0.0.1:{port}"
    server = UpscaleTestServer(
        url=base,
        rest_url=f"{base}/v1",
        ws_url=f"ws://127.0.0.1:{port}/v1",
        api_key=api_key,
        port=port,
        data_dir=data_dir,
        log_path=log_path,
        process=process,
    )
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"the test server exited with code {process.returncode}:\n{server.log()}")
        if _ready(server.url):
            return server
        time.sleep(0.05)
    stop_server(server)
    raise ServerStartError(f"the test server did not answer within {startup_timeout:.0f} s:\n{server.log()}")


@contextlib.contextmanager
def run_test_server(
    *,
    data_dir: Path | None = None,
    models_dir: Path | None = None,
    api_key: str | None = None,
    port: int | None = None,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
) -> Iterator[UpscaleTestServer]:
    """Run a test-target server for the duration of the ``with`` block.

    ``data_dir``: the server's data folder (images, SQLite), also holding ``server.log`` (default: a
    temporary folder, removed afterwards). ``models_dir``: default an empty folder inside it (the resize engine needs no
    weights). ``api_key``: default a random one; the server accepts only that key. ``port``: default a
    free one (retried if another process takes it first). ``python``: the interpreter that runs the
    server, default ``$UPSCALE_TEST_SERVER_PYTHON`` or this one. ``env``: extra ``UPSCALE_*``
    settings, e.g. ``{"UPSCALE_MAX_QUEUE": "2"}`` or ``{"UPSCALE_RESIZE_DELAY_SECONDS": "5"}`` (each upscale
    then stays in progress that long).

    A second server on the same ``data_dir``, once the first has stopped (or was killed through
    ``server.process``), is a restart: the same database and images, ``server.log`` appended to.
    """
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="upscale-test-server-")))
        data_dir.mkdir(parents=True, exist_ok=True)
        if models_dir is None:
            models_dir = data_dir / "models"
            models_dir.mkdir(exist_ok=True)
        key = api_key or f"test-{secrets.token_urlsafe(18)}"
        interpreter = python or os.environ.get(PYTHON_ENV) or sys.executable
        server_env = _server_env(env)
        attempts = 1 if port is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                server = _start(
                    interpreter,
                    data_dir=data_dir,
                    models_dir=models_dir,
                    api_key=key,
                    port=port or free_port(),
                    env=server_env,
                    startup_timeout=startup_timeout,
                )
                break
            except ServerStartError as exc:
                if attempt == attempts or "address already in use" not in str(exc).lower():
                    raise
        try:
            yield server
        finally:
            stop_server(server)


try:
    import pytest
except ImportError:  # run_test_server works without pytest; the fixture needs it
    pass
else:

    @pytest.fixture(scope="session")
    def upscale_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpscaleTestServer]:
        """A test-target server shared by the whole session: ``.url``, ``.rest_url``, ``.ws_url``, ``.api_key``.

        Its files (and ``server.log``) are in a pytest temp folder, kept after the run like any other.
        """
        with run_test_server(data_dir=tmp_path_factory.mktemp("upscale-server")) as server:
            yield server

"""The end-to-end harness: real server processes, started by the pytest plugin's ``run_test_server``.

A server here is exactly what a user's test gets from ``upscale_server.testing``: ``python -m
upscale_server serve`` in its own process on a free 127.0.0.1 port, ready once ``/ready`` answers,
stopped by PID. It runs the resize engine (test-target mode), so every upscale takes milliseconds
and its output is deterministic; where a test needs a task to stay in progress it holds it on an
event (an input URL on a local receiver that answers when the test says so) or on
``UPSCALE_RESIZE_DELAY_SECONDS``, and waits for observable state (``getResponse`` says
``processing``), never for a number of seconds. A test that needs the real network says so itself.

Every test under ``tests/e2e/`` is marked ``e2e`` (by the root ``conftest.py``, which keeps the lanes):
``scripts/test --fast`` leaves them out, CI runs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from upscale_server.testing import UpscaleTestServer, run_test_server

#: Inputs may come from 127.0.0.1: the server's own imageURLs, and the tests' local receivers.
LOCAL_INPUTS = {"UPSCALE_OUTBOUND_ALLOW": '["127.0.0.1"]'}


@contextlib.contextmanager
def live_server_at(
    data_dir: Path, *, env: Mapping[str, str] | None = None, api_key: str | None = None, **options: object
) -> Iterator[UpscaleTestServer]:
    """``run_test_server`` on ``data_dir`` with local inputs allowed and extra ``UPSCALE_*`` settings ``env``.

    A second call on the same ``data_dir`` is a restart: the same database and images (and ``server.log``,
    appended to). Pass the same ``api_key`` to keep talking to it with one key.
    """
    settings = {**LOCAL_INPUTS, **(env or {})}
    with run_test_server(data_dir=data_dir, env=settings, api_key=api_key, **options) as server:  # type: ignore[arg-type]
        yield server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpscaleTestServer]:
    """One test-target server for the e2e session (SDK suites, frame limits), local inputs allowed."""
    with live_server_at(tmp_path_factory.mktemp("live-server")) as server:
        yield server

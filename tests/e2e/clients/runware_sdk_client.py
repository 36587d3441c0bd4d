"""Drive PyPI ``runware-sdk`` 1.8.0 (``from runware import Runware``) against a server, as a user would.

Run it with the interpreter of ``.venv-sdk-runware-sdk`` (made by ``scripts/setup-sdks``)::

    .venv-sdk-runware-sdk/bin/python tests/e2e/clients/runware_sdk_client.py \\
        --transport websocket --url ws://127.0.0.1:PORT/v1 --api-key test-key < plan.json
    .venv-sdk-runware-sdk/bin/python tests/e2e/clients/runware_sdk_client.py \\
        --transport rest --url http://127.0.0.1:PORT/v1 --api-key test-key < plan.json

The client is built with ``ws_base_url=`` (WebSocket) or ``transport="rest", http_base_url=`` (REST),
``validate=False`` and bounded timeouts; plans always pass ``taskType`` and AIR model ids, so the SDK
never asks Runware's schema registry (there is no internet in CI). The plan format and the JSON report
are described in ``_plan.py``. Operations (``op``):

* ``image_upload`` — ``image_upload(args)`` (``{"image": <data URI | base64 | URL>}``).
* ``run`` — ``run(args)``: any task, e.g. ``{"taskType": "upscale", "model": ..., "inputs": {...}}``;
  with ``deliveryMethod: "async"`` the SDK itself waits for the ACK and polls getResponse.
* ``get_response`` — ``get_response({"taskUUID": ...})``.
* ``rest_wait`` — poll getResponse over plain REST until done (see ``_plan.rest_wait_until_done``).

Errors (``RunwareError``) are reported with the SDK's public fields: ``code`` (the SDK's *category*:
``auth``, ``validation``, ``notFound``...; this SDK deliberately hides the server's raw code),
``parameter``, ``task_type``, ``task_uuid``, ``status_code`` and the message.
"""

from __future__ import annotations

import argparse
from typing import Any

import _plan
from runware import Runware, RunwareError
from runware import __version__ as sdk_version

TIMEOUT_MS = 120_000


def describe_error(exc: BaseException) -> dict[str, Any]:
    error = _plan.basic_error(exc)
    if isinstance(exc, RunwareError):
        error.update(
            code=exc.code,
            parameter=exc.parameter,
            task_type=exc.task_type,
            task_uuid=exc.task_uuid,
            status_code=exc.status_code,
            retryable=exc.retryable,
        )
    return error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["websocket", "rest"], required=True)
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/v1 or http://HOST:PORT/v1")
    parser.add_argument("--api-key", required=True)
    options = parser.parse_args()

    async def build_report() -> dict[str, Any]:
        common: dict[str, Any] = {
            "validate": False,
            "timeout": TIMEOUT_MS,
            "poll_timeout": TIMEOUT_MS,
            "auth_timeout": 15_000,
        }
        if options.transport == "websocket":
            client = Runware(api_key=options.api_key, ws_base_url=options.url, **common)
        else:
            client = Runware(api_key=options.api_key, transport="rest", http_base_url=options.url, **common)

        async def image_upload(args: dict[str, Any]) -> Any:
            return await client.image_upload(args)

        async def run(args: dict[str, Any]) -> Any:
            return await client.run(args)

        async def get_response(args: dict[str, Any]) -> Any:
            return await client.get_response(args)

        return await _plan.run_plan(
            sdk=f"runware-sdk/{options.transport}",
            version=sdk_version,
            connect=client.connect,
            disconnect=client.close,
            ops={"image_upload": image_upload, "run": run, "get_response": get_response},
            describe_error=describe_error,
        )

    _plan.main(build_report)


if __name__ == "__main__":
    main()

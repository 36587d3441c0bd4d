"""Drive PyPI ``runware`` 0.5.24 (``from runware import Runware``) against a server, as a user would.

Run it with the interpreter of ``.venv-sdk-runware`` (made by ``scripts/setup-sdks``)::

    .venv-sdk-runware/bin/python tests/e2e/clients/runware_client.py \\
        --url ws://127.0.0.1:PORT/v1 --api-key test-key < plan.json

The plan format and the JSON report are described in ``_plan.py``. Operations (``op``):

* ``upload`` — ``uploadImage(args["image"])``. This SDK only uploads *local files* (it reads the file
  and sends a data URI); a UUID/URL/data-URI/base64 string is returned unchanged without a request.
* ``upscale`` — ``imageUpscale(IImageUpscale(**args))`` (``deliveryMethod`` ``"sync"`` or
  ``"async"``); the result is the list of ``IImage`` (sync) or the ``IAsyncTaskResponse`` ACK (async).
* ``get_response`` — ``getResponse(taskUUID=args["taskUUID"])``: the list of ``IImage``.
* ``rest_wait`` — poll getResponse over plain REST until done (see ``_plan.rest_wait_until_done``).

Errors are reported with their class, message and, for ``RunwareAPIError``, ``code`` and the error
object the server sent (``error_data``).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import _plan
from runware import IImageUpscale, Runware, RunwareAPIError
from runware import __version__ as runware_version


def as_json(value: Any) -> Any:
    """SDK dataclasses (and lists of them) as plain JSON values, without the ``None`` fields."""
    if isinstance(value, list):
        return [as_json(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.asdict(value)
        return {"_class": type(value).__name__, **{k: v for k, v in fields.items() if v is not None}}
    return value


def describe_error(exc: BaseException) -> dict[str, Any]:
    error = _plan.basic_error(exc)
    if isinstance(exc, RunwareAPIError):
        error["code"] = exc.code
        error["error_data"] = exc.error_data
    return error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="WebSocket URL, ws://HOST:PORT/v1")
    parser.add_argument("--api-key", required=True)
    options = parser.parse_args()

    async def build_report() -> dict[str, Any]:
        client = Runware(api_key=options.api_key, url=options.url)

        async def upload(args: dict[str, Any]) -> Any:
            return as_json(await client.uploadImage(args["image"]))

        async def upscale(args: dict[str, Any]) -> Any:
            return as_json(await client.imageUpscale(IImageUpscale(**args)))

        async def get_response(args: dict[str, Any]) -> Any:
            return as_json(await client.getResponse(taskUUID=args["taskUUID"]))

        return await _plan.run_plan(
            sdk="runware",
            version=runware_version,
            connect=client.connect,
            disconnect=client.disconnect,
            ops={"upload": upload, "upscale": upscale, "get_response": get_response},
            describe_error=describe_error,
        )

    _plan.main(build_report)


if __name__ == "__main__":
    main()

"""REST transport: ``POST /v1`` with a task array, and ``GET /image/<uuid>.<ext>`` for stored images.

``/v1/`` is the same route, answered directly: a redirect would turn some clients' POST into a GET.
``X-Runware-Dry-Run: 1`` validates the tasks as a real run would and answers without running them.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, RedirectResponse

from upscale_server.api.context import (
    RunwareJSONResponse,
    ServerContext,
    dry_run_requested,
    json_reply,
    parse_tasks,
    server_context,
)
from upscale_server.api.preauth import read_authenticated_body
from upscale_server.errors import ImageNotFoundError, UpscaleError, error_item, http_status_for
from upscale_server.protocol import Outcome, envelope
from upscale_server.tasks.results import IMAGE_ROUTE

router = APIRouter()


def error_response(
    exc: UpscaleError, task_type: str | None = None, task_uuid: str | None = None
) -> RunwareJSONResponse:
    item = error_item(exc, task_type=task_type, task_uuid=task_uuid)
    return RunwareJSONResponse(envelope(errors=[item]), status_code=exc.http_status)


async def read_body(request: Request, context: ServerContext, bearer: str | None) -> bytearray:
    """The request body, refused past ``max_body_bytes`` and read past ``max_unauthenticated_bytes``
    only once its key is accepted (Starlette itself has no cap)."""
    declared = request.headers.get("content-length", "")
    return await read_authenticated_body(
        request.stream(),
        context.keys,
        bearer=bearer,
        declared=int(declared) if declared.isdigit() else None,
        max_body_bytes=context.settings.max_body_bytes,
        max_unauthenticated_bytes=context.settings.max_unauthenticated_bytes,
        unauthenticated_timeout=context.settings.header_timeout_seconds,
    )


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@router.post("/v1")
@router.post("/v1/", include_in_schema=False)
async def run_tasks(request: Request) -> Response:
    context = server_context(request)
    try:
        bearer = bearer_key(request)
        body = await read_body(request, context, bearer)
        raw_tasks = await parse_tasks(body, context.settings)
        owner, raw_tasks = context.keys.authenticate_request(raw_tasks, bearer=bearer)
    except UpscaleError as exc:
        return error_response(exc)

    outcomes: list[Outcome] = []

    async def collect(outcome: Outcome) -> None:
        outcomes.append(outcome)

    await context.dispatcher.dispatch(
        raw_tasks,
        base_url=context.base_url(request),
        emit=collect,
        dry_run=dry_run_requested(request.headers.get("x-runware-dry-run")),
        owner=owner,
    )
    data = [o.item for o in outcomes if o.item is not None]
    errors = [o.error for o in outcomes if o.error is not None]
    status = 200 if data or not errors else http_status_for([o.status for o in outcomes if o.error])
    return await json_reply(envelope(data=data, errors=errors), status_code=status)


@router.get(IMAGE_ROUTE)
async def get_image(name: str, request: Request) -> Response:
    """A stored image, from disk when the storage is local, else read through the storage."""
    images = server_context(request).images
    image_uuid, _, extension = name.partition(".")
    stored = await asyncio.to_thread(images.get, image_uuid)
    if stored is None or extension != stored.extension:
        return error_response(ImageNotFoundError(f"no image {name} (unknown or expired)", parameter="image"))
    if stored.local_path is not None:
        return FileResponse(stored.local_path, media_type=stored.content_type)
    redirect = images.presigned_url(stored)
    if redirect is not None:
        return RedirectResponse(redirect, status_code=307)
    try:
        data = await asyncio.to_thread(images.read_bytes, stored)
    except FileNotFoundError:  # expired and swept since the lookup
        return error_response(ImageNotFoundError(f"no image {name} (unknown or expired)", parameter="image"))
    return Response(data, media_type=stored.content_type)

"""The playground page at ``GET /``, its static files under ``/playground/``, and the model list it shows.

Everything is served with ``FileResponse`` from ``server/upscale_server/web/static/`` by name (no directory mount), so
including :data:`router` is the only wiring the app needs. The files are small and change with the
code, so they are sent with ``Cache-Control: no-cache``: browsers keep them but revalidate each load.
The page talks to the server only through the public Runware API (``POST /v1``) like any client;
``GET /playground/models`` is a read-only helper that lists the models (the manifest's and your own).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse

from upscale_server.api.context import server_context

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: The only files served under /playground/, with their content types.
STATIC_FILES: dict[str, str] = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}

CACHE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=CACHE_HEADERS)


@router.get("/playground/models")
async def playground_models(request: Request) -> JSONResponse:
    """Every model (the manifest's and the files dropped into the models folder, with the factors each
    serves: none for a restoration model), the default one, and whether the server wants an API key."""
    context = server_context(request)
    models = await asyncio.to_thread(context.models)  # lists the models folder
    body = {
        "models": [
            {
                "id": model.id,
                "name": model.name,
                "description": model.description,
                "scale": model.scale,
                "factors": list(model.factors),
            }
            for model in models
        ],
        "default": context.settings.default_model,
        "keysRequired": not context.keys.open_mode,
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.get("/playground/{name}")
async def playground_static(name: str) -> FileResponse:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"no playground file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=CACHE_HEADERS)

"""``/docs`` (Swagger UI) and ``/redoc`` with their scripts, styles and icon served by this
app from the ``fastapi-offline`` package: FastAPI's defaults load them from a CDN, which
leaves both pages blank on a machine without internet."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
PREFIX = "/docs-assets"


def assets_folder() -> Path:
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package fastapi-offline is missing: pip install fastapi-offline")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def build_docs_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    folder = assets_folder()

    @router.get("/docs")
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=request.app.openapi_url,
            title=f"{request.app.title} - API",
            swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{PREFIX}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
        )

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=request.app.openapi_url,
            title=f"{request.app.title} - API",
            redoc_js_url=f"{PREFIX}/redoc.standalone.js",
            redoc_favicon_url=f"{PREFIX}/favicon.png",
            with_google_fonts=False,
        )

    @router.get(PREFIX + "/{asset}")
    async def asset(asset: str) -> FileResponse:
        if asset not in ASSETS:
            from starlette.exceptions import HTTPException

            raise HTTPException(404, f"no asset {asset!r}")
        return FileResponse(folder / asset, headers={"Cache-Control": "public, max-age=86400"})

    return router

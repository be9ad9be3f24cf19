"""``GET /``: the web page (static files shipped in ``app/web/static``). No torch here.

The files are read once, when the router is built: a handful of small files, served from
memory with an ETag so that a browser revalidates instead of re-downloading. Only the files
found at build time are served (a lookup in a dict, never a path joined from the URL).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".md": "text/markdown; charset=utf-8",
}

# Everything the page needs comes from this origin; photos are shown from blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


def static_root() -> Traversable:
    return resources.files("app.web") / "static"


def read_static(root: Traversable, prefix: str = "") -> dict[str, StaticFile]:
    """``{"app.js": ..., "examples/cat.jpg": ...}``: every file under ``root`` with a known type."""
    files: dict[str, StaticFile] = {}
    for entry in root.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            files |= read_static(entry, name + "/")
            continue
        media_type = MEDIA_TYPES.get("." + entry.name.rpartition(".")[2])
        if media_type is None or entry.name.startswith("."):
            continue
        body = entry.read_bytes()
        files[name] = StaticFile(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return files


def build_web_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    files = read_static(static_root())

    def serve(request: Request, name: str) -> Response:
        file = files.get(name)
        if file is None:
            raise StarletteHTTPException(404, f"no such file: /static/{name}")
        headers = {"ETag": file.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if file.media_type.startswith("text/html"):
            headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        if request.headers.get("if-none-match") == file.etag:
            return Response(status_code=304, headers=headers)
        return Response(file.body, media_type=file.media_type, headers=headers)

    @router.get("/")
    async def page(request: Request) -> Response:
        return serve(request, "index.html")

    @router.get("/static/{name:path}")
    async def static(request: Request, name: str) -> Response:
        return serve(request, name)

    return router

"""What every route shares: the engine and settings of the app, the API key, disconnects,
and the error responses documented in OpenAPI."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request

from app.config import Settings
from app.engine.engine import Engine

from .errors import ClientDisconnected, Unauthorized
from .schemas import ErrorBody

T = TypeVar("T")


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


async def require_api_key(request: Request) -> None:
    """Bearer auth for inference routes when ``EQUISERVE_API_KEY`` is set (constant-time compare).

    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency in its thread
    pool, one more thread hop on every request."""
    key = settings_of(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")


def error_responses(**descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the common errors, with a route's own descriptions (``e413=...``)."""
    common = {
        401: "API key missing or wrong",
        404: "unknown model, or a model of another task",
        413: "over a limit",
        422: "invalid fields",
        429: "queue full; retry after the Retry-After header",
        503: "loading or shutting down",
        504: "deadline passed while queued",
    }
    common.update({int(key.removeprefix("e")): text for key, text in descriptions.items()})
    return {status: {"model": ErrorBody, "description": text} for status, text in sorted(common.items())}


async def until_disconnected(request: Request, work: Callable[[Callable[[], Awaitable[Any]]], Awaitable[T]],
                             read_body: Callable[[], Awaitable[Any]]) -> T:  # fmt: skip
    """Run ``work(reader)`` unless the client disconnects first; then cancel it (its queued
    items are dropped before the forward pass) and answer 499.

    ``reader`` reads the body with ``read_body`` when the engine asks for it (after
    admission); only after the whole body can the next ASGI message be the disconnect, so
    the watcher starts listening then, and never after a read that failed (its error is the
    answer; the rest of such a body is not read)."""
    body_read = asyncio.Event()

    async def reader() -> Any:
        body = await read_body()  # a body that fails to read (too large, too slow) fails the work itself
        body_read.set()
        return body

    async def disconnected() -> None:
        await body_read.wait()
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work(reader))
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        raise ClientDisconnected("the client disconnected before its answer was ready")
    return task.result()

"""``create_app(settings)``: the FastAPI app whose lifespan loads the models once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.api.generate import build_generate_router
from app.api.middleware import BodyTooLarge, RequestContextMiddleware
from app.api.routes import build_router, validation_message
from app.config import Settings
from app.engine.engine import Engine
from app.engine.errors import EngineError, QueueFull
from app.engine.text_engine import TextEngine

log = logging.getLogger("equiserve.server")

DESCRIPTION = """
Invariant and equivariant predictions from pretrained models with λ-equitune
(Basu et al., NeurIPS 2023): every request's image is transformed by each element of a
group (e.g. the four 90° rotations), all copies of the whole batch go through the backbone
in one fused pass, and the outputs are combined — uniformly (equitune), by the most
confident copy (equizero) or with learned weights λ (λ-equitune).
"""


def error_response(request: Request, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = engine or Engine(settings)
    text_engine = TextEngine(settings, engine.metrics, parent=engine)  # language models (task generate)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        await text_engine.start()
        log.info("ready: serving %s", ", ".join([*engine.models, *text_engine.models]))
        try:
            yield
        finally:
            await text_engine.stop()
            await engine.stop()
            log.info("stopped: every accepted request was answered")

    app = FastAPI(title="equiserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.text_engine = text_engine
    app.include_router(build_router())
    app.include_router(build_generate_router())
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        metrics=engine.metrics,
        served_models=lambda: set(engine.models) | set(text_engine.models),
    )

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        headers = None
        if isinstance(exc, QueueFull):
            headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
        elif exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        if exc.status >= 500:
            log.warning("request %s: %s %s", getattr(request.state, "request_id", "-"), exc.status, exc.message)
        return error_response(request, exc.status, exc.code, exc.message, headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client hung up while sending its body: nobody will read an answer, and it is
        # no server fault. Recorded as 499 (nginx's "client closed request"), not a 500.
        message = "the client disconnected while sending its body"
        log.info("request %s: %s", getattr(request.state, "request_id", "-"), message)
        return error_response(request, 499, "client_closed_request", message)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(request, 413, "too_large", str(exc), {"Connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_input", validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", getattr(request.state, "request_id", "-"))
        return error_response(request, 500, "internal_error", f"internal error ({type(exc).__name__})")

    return app

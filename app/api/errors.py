"""Engine errors and HTTP-only errors -> ``{"error": {"code", "message", "request_id"}}``
with the right status. The one place that knows which status each kind of error gets."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.errors import EngineError, QueueFull
from app.tasks.http import validation_message

from .middleware import BodyTimeout, BodyTooLarge, is_v2

log = logging.getLogger("equiserve.api")

# engine error code -> HTTP status
STATUS: dict[str, int] = {
    "invalid_input": 422,
    "undecodable_image": 400,
    "unsupported_media_type": 415,
    "too_large": 413,
    "model_not_found": 404,
    "queue_full": 429,
    "not_ready": 503,
    "deadline_exceeded": 504,
    "inference_failed": 500,
    "malformed_body": 400,
    "invalid_tensor": 400,
}


class ApiError(Exception):
    """An error of the HTTP exchange itself (auth, body framing), not of the engine."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class ClientDisconnected(ApiError):
    status, code = 499, "client_closed_request"  # nginx's "client closed request"


def status_of(exc: EngineError) -> int:
    return STATUS.get(exc.code, 500)


def error_response(request: Request, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The error in the shape of the request's protocol: ``/v2/...`` (every path, served or not)
    gets the Open Inference Protocol's ``{"error": message}``, everything else ``/v1``'s."""
    if is_v2(request.url.path):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    request_id = getattr(request.state, "request_id", None)
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        status = status_of(exc)
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))} if isinstance(exc, QueueFull) else None
        if status >= 500:
            log.warning("request %s: %s %s", getattr(request.state, "request_id", "-"), status, exc.message)
        return error_response(request, status, exc.code, exc.message, headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return error_response(request, exc.status, exc.code, exc.message, headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client hung up while sending its body: nobody will read an answer, and it is
        # no server fault. Recorded as 499, not a 500.
        message = "the client disconnected while sending its body"
        log.info("request %s: %s", getattr(request.state, "request_id", "-"), message)
        return error_response(request, 499, ClientDisconnected.code, message)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(request, 413, "too_large", str(exc), {"Connection": "close"})

    @app.exception_handler(BodyTimeout)
    async def body_timeout(request: Request, exc: BodyTimeout) -> JSONResponse:
        return error_response(request, 408, "request_timeout", str(exc), {"Connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_input", validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", getattr(request.state, "request_id", "-"))
        return error_response(request, 500, "internal_error", f"internal error ({type(exc).__name__})")

"""Pure ASGI middleware: request ids, the body-size limit and timeout, request metrics, the access log.

Pure ASGI (not ``BaseHTTPMiddleware``) so that streaming bodies are counted as they arrive
and a client disconnect still reaches the route (which drops its queued work).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import tracing
from app.metrics import Metrics
from app.tasks import TASKS

log = logging.getLogger("equiserve.access")

# /v1/models/{name}/{task} and the Open Inference Protocol's /v2/models/{name}[/versions/{v}]/infer
INFERENCE_PATH = re.compile(
    rf"^/v1/models/(?P<model>[^/]+)/(?P<endpoint>{'|'.join(TASKS)})$"
    r"|^/v2/models/(?P<v2model>[^/]+)(?:/versions/[^/]+)?/(?P<v2endpoint>infer)$"
)
# Probes and scrapes come every few seconds: their access lines are DEBUG, not INFO.
QUIET_PATHS = ("/health/", "/v2/health/", "/metrics")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def printable(text: str) -> str:
    """``text`` for a log line: control characters (a percent-encoded newline or NUL in a URL
    path decodes to one) and other unprintable ones escaped, so a request cannot forge a line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def is_v2(path: str) -> bool:
    """Whether a path is the Open Inference Protocol's, whose errors have their own shape."""
    return path == "/v2" or path.startswith("/v2/")


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes (EQUISERVE_MAX_BODY_BYTES)")
        self.limit = limit


class BodyTimeout(Exception):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"no part of the request body came for {timeout_s:g} s (EQUISERVE_BODY_TIMEOUT_S)")


def error_json(status: int, code: str, message: str, request_id: str | None, *, v2: bool = False) -> tuple[bytes, list]:
    """An error body written before the app runs, in /v1's shape or (``v2``) the protocol's."""
    error = message if v2 else {"code": code, "message": message, "request_id": request_id}
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    return body, headers


class RequestContextMiddleware:
    """Gives every request an id (``X-Request-ID``, echoed back), enforces the body limit,
    and records ``equiserve_requests_total`` / ``equiserve_request_duration_seconds`` for
    the inference routes."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout_s: float,
        metrics: Metrics,
        served_models: Callable[[], set[str]],
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics
        self.served_models = served_models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        # A fresh dict: scope["state"] may be the lifespan state shared by every request.
        scope["state"] = {**scope.get("state", {}), "request_id": request_id}

        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(scope, send, request_id)
            return

        received = 0
        limit, timeout_s = self.max_body_bytes, self.body_timeout_s
        body_complete = False

        async def counting_receive() -> Message:
            # While the body is read, each piece must come within the body timeout (a client
            # trickling its body would hold a request, and its slot, for as long as it likes);
            # afterwards receive() only waits for the disconnect, which may take any time.
            nonlocal received, body_complete
            if body_complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeout(timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                body_complete = not message.get("more_body", False)
            else:
                body_complete = True
            return message

        match = INFERENCE_PATH.match(scope.get("path", ""))
        status_holder = {"status": 500}
        # Only the inference routes are traced (probes and scrapes would drown them): one check when off.
        span = self._server_span(scope, match, request_id) if tracing.enabled and match is not None else None
        answer_headers = [(b"x-request-id", request_id.encode())]
        if span is not None and span.trace_id is not None:
            answer_headers.append((tracing.TRACE_ID_HEADER, span.trace_id.encode()))

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *answer_headers]
            await send(message)

        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            await self.app(scope, counting_receive, recording_send)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            status, seconds, path = status_holder["status"], time.perf_counter() - started, scope.get("path", "")
            if match is not None:
                model, endpoint = self._labels(match)
                self.metrics.requests.labels(model, endpoint, str(status)).inc()
                self.metrics.request_duration.labels(model, endpoint).observe(seconds)
            # The one access line of a request (uvicorn's own is off): ids, route, sizes and
            # outcome only, never image bytes, labels or prompts.
            level = logging.DEBUG if path.startswith(QUIET_PATHS) else logging.INFO
            traced = f" trace_id={span.trace_id}" if span is not None and span.trace_id is not None else ""
            log.log(level, "request_id=%s %s %s status=%d bytes=%d ms=%.1f%s",
                    request_id, printable(scope.get("method", "-")), printable(path), status, received,
                    seconds * 1000, traced)  # fmt: skip
            if span is not None:
                span.end(status, failure)

    def _server_span(self, scope: Scope, match: re.Match[str], request_id: str) -> tracing.ServerSpan:
        """The request's server span (its route as the name: bounded, unlike the path)."""
        model, endpoint = self._labels(match)
        route = "/v1/models/{name}/" + endpoint if match["model"] else "/v2/models/{name}/infer"
        span = tracing.ServerSpan.http(scope.get("method", "-"), route, scope.get("path", ""), scope.get("headers", []))
        span.set(**{"equiserve.model": model, "equiserve.request_id": request_id})
        if match["model"]:
            span.set(**{"equiserve.task": endpoint})
        return span

    def _labels(self, match: re.Match[str]) -> tuple[str, str]:
        """(model, endpoint) labels; names that are not served count as "unknown" (bounded series)."""
        name, endpoint = match["model"] or match["v2model"], match["endpoint"] or match["v2endpoint"]
        return (name if name in self.served_models() else "unknown"), endpoint

    async def _reject(self, scope: Scope, send: Send, request_id: str) -> None:
        path = scope.get("path", "")
        body, headers = error_json(
            413,
            "too_large",
            f"request body over {self.max_body_bytes} bytes (EQUISERVE_MAX_BODY_BYTES)",
            request_id,
            v2=is_v2(path),
        )
        match = INFERENCE_PATH.match(scope.get("path", ""))
        if match is not None:
            model, endpoint = self._labels(match)
            self.metrics.requests.labels(model, endpoint, "413").inc()
            self.metrics.rejected.labels(model, "too_large").inc()
        await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

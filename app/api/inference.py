"""``POST /v1/models/{name}/{task}`` for every registered task, written once.

Each task's adapter (``app.tasks.<task>.http``) says how its body becomes its request and its
answer becomes JSON; everything else is here, the same for every task: the API key (a
dependency, checked before any byte of the body is read), admission by the engine before the
body is read, the deadline, a client that disconnects (its queued work is dropped), streaming as
server-sent events for adapters that stream, and the OpenAPI entry. Errors are raised as
``app.errors``' and mapped to statuses by ``app.api.errors``. No torch here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from app import tracing
from app.engine.engine import StreamEvent
from app.errors import EngineError
from app.tasks import TASKS, task_http
from app.tasks.base import ServedModel
from app.tasks.http import Served, TaskHttp, answer_schema, inline_definitions, to_json

from .common import engine_of, error_responses, require_api_key, settings_of, until_disconnected
from .schemas import ErrorBody

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def task_path(task: str) -> str:
    """The one route of ``task``; ``GET /openapi.json`` lists it once per served model."""
    return f"/v1/models/{{name}}/{task}"


def served_for(request: Request, model: ServedModel) -> Served:
    """What ``model``'s adapter may know of it, here (its limits, the body limit, its queue)."""
    settings = settings_of(request)
    return served_model(model, settings.max_body_bytes, settings.queue_size)


def served_model(model: ServedModel, max_body_bytes: int, queue_size: int | None) -> Served:
    return Served(model.card(), model.limits, max_body_bytes, queue_size)


def build_inference_router() -> APIRouter:
    router = APIRouter()
    for task in TASKS:
        add_task_route(router, task, task_http(task))
    return router


def add_task_route(router: APIRouter, task: str, http: TaskHttp) -> None:
    async def infer(name: str, request: Request) -> Response:
        engine = engine_of(request)
        request_id = request.state.request_id

        async def read() -> Any:
            return await http.read(request, served_for(request, engine.model(name, task)))

        source = read
        if http.streams:
            # Whether to stream is in the body: read it first (a small JSON body; the key was checked).
            engine.check_accepting()
            parsed = await read()
            if http.wants_stream(parsed):
                return await stream(request, engine.stream(name, task, parsed, request_id=request_id), http)

            async def given() -> Any:
                return parsed

            source = given
        output = await until_disconnected(
            request, lambda reader: engine.infer(name, task, reader, request_id=request_id), source
        )
        with tracing.span_here("equiserve.answer") if tracing.enabled else tracing.NO_SPAN:
            body = http.encode(output)
        return Response(body, media_type="application/json")

    schema = inline_definitions(answer_schema(http.answer_type))
    ok: dict[str, Any] = {"description": "the answer", "content": {"application/json": {"schema": schema}}}
    if http.streams:
        ok["content"]["text/event-stream"] = event_stream(http, schema)
    router.add_api_route(
        task_path(task),
        infer,
        methods=["POST"],
        name=task,
        tags=["inference"],
        dependencies=[Depends(require_api_key)],
        summary=http.summary,
        responses={200: ok, **error_responses(**{f"e{status}": text for status, text in http.errors.items()})},
        openapi_extra={"requestBody": http.openapi_body()},
    )


def event_stream(http: TaskHttp, answer: dict[str, Any]) -> dict[str, Any]:
    """The ``text/event-stream`` media type of a streaming route: OpenAPI 3.2's ``itemSchema`` is
    one event (the fields ``event`` and ``data``, the data as JSON of its own schema); ``schema``,
    which 3.1 reads as the body and 3.2 as the array of events, says no more than either can hold."""
    kinds: dict[str, dict[str, Any]] = {
        **{kind: inline_definitions(answer_schema(event_type)) for kind, event_type in http.stream_events.items()},
        "done": answer,
        "error": inline_definitions(ErrorBody.model_json_schema()),
    }
    item = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {"event": {"enum": list(kinds)}, "data": {"type": "string"}},
        "oneOf": [
            {
                "properties": {
                    "event": {"const": kind},
                    "data": {"contentMediaType": "application/json", "contentSchema": data},
                }
            }
            for kind, data in kinds.items()
        ],
    }
    events = ", ".join(f"`{kind}`" for kind in http.stream_events)
    return {
        "schema": {
            "description": f"server-sent events: {events} as the model makes them, then `done` (the answer above) "
            "or `error` (the error body); itemSchema describes each"
        },
        "itemSchema": item,
    }


def sse(event: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


async def stream(request: Request, events: AsyncIterator[StreamEvent], http: TaskHttp) -> Response:
    """Server-sent events: one per event the model emits (its dataclass as JSON), then ``done``
    (the answer) or ``error``. Errors before the request's batch starts keep their status."""
    request_id = request.state.request_id
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            event: StreamEvent | None = first
            while event is not None:
                if event.kind == "done":
                    yield sse("done", http.encode(event.data))
                elif event.kind == "error":
                    exc = event.data
                    code, message = (exc.code, exc.message) if isinstance(exc, EngineError) else ("error", str(exc))
                    error = {"error": {"code": code, "message": message, "request_id": request_id}}
                    yield sse("error", json.dumps(error, ensure_ascii=False).encode())
                elif event.data is not None:  # "start" carries nothing for the client
                    yield sse(event.kind, to_json(event.data))
                event = await anext(events, None)
        finally:
            await events.aclose()  # stops decoding this request when the client left

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

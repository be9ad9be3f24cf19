"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) over the same engine.

``GET /v2`` (server metadata), ``GET /v2/models/{name}[/versions/1]`` (model metadata),
``.../ready`` and ``POST .../infer`` for the models of every task whose adapter has a
``V2Mapping`` (``app.tasks.<task>.http``); the health routes are ``app.api.routes``'. Tensors
are parsed and encoded by ``app.oip`` (JSON ``data`` or the binary tensor data extension).

The request becomes the task's request object and goes through ``engine.infer`` like a /v1
request (admission before the body is read, batching, deadlines, cancellation), so both
protocols share the batcher and answer alike. Errors are the protocol's ``{"error": message}``:
400 for a bad tensor or field, and the engine's statuses otherwise (404, 413, 429, 503, 504).
No torch here: the tensors are numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from app.engine.engine import Engine
from app.errors import EngineError, ModelNotFound, NotReady, QueueFull, UnsupportedBody
from app.oip import (
    HEADER_LENGTH,
    IGNORED_PARAMETERS,
    MAX_RANK,
    VERSION,
    InferBody,
    TensorError,
    TensorSchema,
    V2Mapping,
    encode_response,
    parse_infer_body,
)
from app.tasks import task_http
from app.tasks.http import inline_definitions

from .common import engine_of, require_api_key, until_disconnected
from .errors import STATUS, ApiError
from .middleware import BodyTooLarge

# The protocol's clients expect 400 for a request they got wrong, whichever field it was.
V2_STATUS = {**STATUS, "invalid_input": 400, "unsupported_media_type": 400}
# A real 2x2 PNG, for the documented example.
EXAMPLE_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="
)


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class V2Route(APIRoute):
    """Errors of /v2 routes in the protocol's shape, ``{"error": message}``, not /v1's."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except UnsupportedBody as exc:  # the body itself (a compressed one), not an image in it
                return v2_error(415, exc.message)
            except EngineError as exc:
                headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))} if isinstance(exc, QueueFull) else None
                return v2_error(V2_STATUS.get(exc.code, 500), exc.message, headers)
            except ApiError as exc:
                return v2_error(exc.status, exc.message, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
            except BodyTooLarge as exc:
                return v2_error(413, str(exc), {"Connection": "close"})

        return route


# GET /v2's extensions (and the gRPC ServerMetadata's: app.api.grpc_service).
EXTENSIONS = ["binary_tensor_data"]


def served(request: Request, name: str, version: str | None) -> tuple[Any, V2Mapping]:
    return served_model(engine_of(request), name, version)


def served_model(engine: Engine, name: str, version: str | None) -> tuple[Any, V2Mapping]:
    """The model ``name`` and how its task speaks v2; 404 (gRPC: NOT_FOUND) for anything the
    protocol does not serve."""
    model = engine.model(name)
    adapter = task_http(model.task).v2
    if adapter is None:
        raise ModelNotFound(f"model {name!r} serves task {model.task!r}, which /v2 does not; use /v1/models/{name}")
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its only version is {VERSION!r}")
    return model, adapter


class V2ErrorBody(BaseModel):
    error: str = Field(examples=["input 'pixels' must be FP32, not FP64"])


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(examples=["FP32", "INT64", "BYTES"])
    shape: list[int] = Field(description="-1: any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class InferTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: its bytes after the JSON header")
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent with binary_data_size")


class InferOutputRequest(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true for raw bytes after the header")


class InferRequestBody(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="method, top_k, binary_data_output, ...")
    inputs: list[InferTensor]
    outputs: list[InferOutputRequest] | None = Field(None, description="the outputs to return (default: all)")


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferTensor]


def v2_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    texts = {
        400: "a bad tensor, parameter or body", 401: "API key missing or wrong", 404: "unknown model or version",
        413: "body, pixels or images over the limits", 415: "a compressed body", 429: "queue full; see Retry-After",
        503: "loading or shutting down", 504: "deadline passed while queued",
    }  # fmt: skip
    return {status: {"model": V2ErrorBody, "description": texts[status]} for status in statuses}


MODEL_PATH = "/v2/models/{name}"  # with "", "/ready" and "/infer": GET /openapi.json names the served models
BINARY_BODY = {
    "schema": {
        "type": "string",
        "format": "binary",
        "description": f"the binary tensor data extension: a JSON header of {HEADER_LENGTH} bytes, then each "
        "tensor's bytes",
    }
}
INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": inline_definitions(InferRequestBody.model_json_schema()),
                "examples": {
                    "an image (base64 in JSON)": {
                        "value": {
                            "id": "1",
                            "parameters": {"method": "lambda", "top_k": 2},
                            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [EXAMPLE_PNG_B64]}],
                            "outputs": [{"name": "probabilities"}, {"name": "lambda"}],
                        }
                    }
                },
            },
            "application/octet-stream": BINARY_BODY,
        },
    }
}


def infer_request_body(
    adapter: V2Mapping, card: dict[str, Any], limits: Any, parameters: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The ``requestBody`` of ``POST /v2/models/<name>/infer`` for one model: its inputs (names,
    datatypes, shapes, elements), ``parameters`` (each one's schema, as its /v1 field has it), its
    outputs. What no JSON Schema can say: that a shape multiplies out to its data's elements (the
    server answers 400 where it does not), and what binary tensor data holds."""
    specs = adapter.inputs(card)
    tensors = [input_tensor_schema(s.name, s.datatype, adapter.input_schema(s, card, limits)) for s in specs]
    outputs = [spec.name for spec in adapter.outputs(card)]
    once = [contains_name(spec.name, 0, 1) for spec in specs]
    required = [contains_name(group, 1, 1) for group in adapter.required_inputs(card)]
    ignored = {"binary_data_output": {"type": "boolean"}, **{name: {} for name in sorted(IGNORED_PARAMETERS)}}
    output_item = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"enum": outputs},
            "parameters": nullable(
                {"type": "object", "properties": {"binary_data": {"type": "boolean"}}, "additionalProperties": False}
            ),
        },
    }
    schema = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": ["string", "null"]},
            "parameters": nullable(
                {
                    "type": "object",
                    "properties": {**{name: parameters[name] for name in sorted(adapter.parameters)}, **ignored},
                    "additionalProperties": False,
                }
            ),
            "inputs": {"type": "array", "minItems": 1, "items": {"oneOf": tensors}, "allOf": [*once, *required]},
            "outputs": nullable(
                {
                    "type": "array",
                    "items": output_item,
                    "allOf": [contains_name(name, 0, 1) for name in outputs],
                    "description": "the outputs to return, each once (absent or empty: all)",
                }
            ),
        },
    }
    return {
        "required": True,
        "content": {"application/json": {"schema": schema}, "application/octet-stream": BINARY_BODY},
    }


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def contains_name(names: str | tuple[str, ...], least: int, most: int) -> dict[str, Any]:
    """An array holding from ``least`` to ``most`` objects named one of ``names``."""
    named = [names] if isinstance(names, str) else list(names)
    item = {"type": "object", "required": ["name"], "properties": {"name": {"enum": named}}}
    return {"contains": item, "minContains": least, "maxContains": most}


def input_tensor_schema(name: str, datatype: str, tensor: TensorSchema) -> dict[str, Any]:
    """One input tensor of a JSON body: its ``data`` flat, or nested as deep as its shape (the
    binary body's ``binary_data_size`` instead of data is that body's own)."""
    rank = len(tensor.dimensions)
    assert rank <= MAX_RANK
    # Flat data holds the shape's product of elements: a number where every size is fixed (JSON
    # Schema cannot multiply a shape sent with it); nested, any regular nesting of that many.
    sizes = [d.get("const") for d in tensor.dimensions]
    flat: dict[str, Any] = {"type": "array", "items": tensor.element}
    if all(isinstance(size, int) for size in sizes):
        flat |= {"minItems": math.prod(sizes), "maxItems": math.prod(sizes)}
    depths, nested = [flat], {"type": "array", "items": tensor.element}
    for _ in range(1, rank):
        nested = {"type": "array", "items": nested}
        depths.append(nested)
    return {
        "type": "object",
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": {"const": name},
            "datatype": {"const": datatype},
            "shape": {
                "type": "array",
                "prefixItems": tensor.dimensions,
                "items": False,
                "minItems": rank,
                "description": "its dimensions: their product is the number of elements in data",
            },
            "data": depths[0] if len(depths) == 1 else {"anyOf": depths},
            "parameters": nullable({"type": "object", "properties": {"binary_data_size": {"type": "null"}}}),
        },
    }


Endpoint = Callable[[Request, str, str | None], Awaitable[Any]]


def add_model_route(router: APIRouter, method: str, suffix: str, endpoint: Endpoint, **documented: Any) -> None:
    """``/v2/models/{name}<suffix>`` and its alias under ``/versions/{version}`` (undocumented)."""

    async def latest(name: str, request: Request) -> Any:
        return await endpoint(request, name, None)

    async def versioned(name: str, version: str, request: Request) -> Any:
        return await endpoint(request, name, version)

    dependencies = documented.pop("dependencies", None)
    name = endpoint.__name__
    router.add_api_route(f"/v2/models/{{name}}{suffix}", latest, methods=[method], name=name,
                         dependencies=dependencies, **documented)  # fmt: skip
    router.add_api_route(f"/v2/models/{{name}}/versions/{{version}}{suffix}", versioned, methods=[method],
                         name=f"{name}_version", dependencies=dependencies, include_in_schema=False)  # fmt: skip


def model_metadata_of(engine: Engine, name: str, version: str | None) -> dict[str, Any]:
    """``GET /v2/models/{name}`` (and gRPC ModelMetadata): the model's tensors."""
    model, adapter = served_model(engine, name, version)
    card = model.card()
    return {
        "name": name,
        "versions": [VERSION],
        "platform": f"equiserve_{model.task}",
        "inputs": [spec.metadata() for spec in adapter.inputs(card)],
        "outputs": [spec.metadata() for spec in adapter.outputs(card)],
    }


def build_v2_router() -> APIRouter:
    router = APIRouter(route_class=V2Route, tags=["open inference protocol (v2)"])

    @router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
    async def server_metadata(request: Request) -> dict[str, Any]:
        return {"name": "equiserve", "version": request.app.version, "extensions": EXTENSIONS}

    async def model_metadata(request: Request, name: str, version: str | None) -> dict[str, Any]:
        return model_metadata_of(engine_of(request), name, version)

    async def model_ready(request: Request, name: str, version: str | None) -> dict[str, Any]:
        engine = engine_of(request)
        if engine.draining or not engine.ready:
            raise NotReady("the server is " + ("shutting down" if engine.draining else "loading its models"))
        served(request, name, version)
        return {"name": name, "ready": True}

    async def model_infer(request: Request, name: str, version: str | None) -> Response:
        engine = engine_of(request)
        model, adapter = served(request, name, version)
        card = model.card()
        specs = adapter.outputs(card)
        parsed: list[InferBody] = []  # the body, once the engine admitted the request and it was read

        async def read_body() -> Any:
            encoding = request.headers.get("content-encoding", "identity").lower()
            if encoding != "identity":
                raise UnsupportedBody(f"Content-Encoding {encoding!r} is not supported: send the body uncompressed")
            body = parse_infer_body(await request.body(), request.headers.get(HEADER_LENGTH))
            known = {spec.name for spec in specs}
            for output in body.outputs or []:
                if output.name not in known:
                    raise TensorError(f"unknown output {output.name!r}; this model gives {sorted(known)}")
            wanted = known if body.outputs is None else {o.name for o in body.outputs}
            parsed.append(body)
            return adapter.request(body, card, model.limits, wanted)

        output = await until_disconnected(
            request,
            lambda read: engine.infer(name, model.task, read, request_id=request.state.request_id),
            read_body,
        )
        content, headers = encode_response(name, parsed[0], adapter.tensors(output), specs)
        return Response(content, headers=headers)

    add_model_route(router, "GET", "", model_metadata, response_model=ModelMetadata, responses=v2_responses(404),
                    summary="Model metadata: its input and output tensors")  # fmt: skip
    add_model_route(router, "GET", "/ready", model_ready, response_model=ModelReady,
                    responses=v2_responses(404, 503), summary="Whether the model takes requests")  # fmt: skip
    add_model_route(
        router,
        "POST",
        "/infer",
        model_infer,
        dependencies=[Depends(require_api_key)],
        response_model=InferResponseBody,
        responses={
            200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            **v2_responses(400, 401, 404, 413, 415, 429, 503, 504),
        },
        openapi_extra=INFER_OPENAPI,
        summary="Inference with JSON or binary tensors",
    )
    return router

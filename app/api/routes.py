"""HTTP routes of the v1 contract. No torch here: the engine does the math."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import Settings
from app.engine.engine import ClassifyOutput, Engine
from app.engine.errors import EngineError, InvalidInput, TooLarge
from app.metrics import CONTENT_TYPE_LATEST

from .images import check_content_type, decode_base64, decode_image
from .schemas import ClassifyJSON, ClassifyResponse, ErrorBody, Health, ModelCard, ModelList


class Unauthorized(EngineError):
    status, code = 401, "unauthorized"


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def require_api_key(request: Request) -> None:
    """Bearer auth for inference routes when ``EQUISERVE_API_KEY`` is set (constant-time compare)."""
    key = settings_of(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")


def inline_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace ``$ref``s into the schema's own ``$defs`` by their content: a request body
    schema in ``openapi_extra`` cannot point into ``components`` that nothing registers."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "undecodable image or invalid base64",
        401: "API key missing or wrong",
        404: "unknown model",
        413: "body, pixels, images or labels over the limits",
        415: "not an image",
        422: "invalid fields (method, top_k, labels, schema)",
        429: "queue full; retry after the Retry-After header",
        503: "loading or shutting down",
        504: "deadline passed while queued",
    }.items()
}

# A real 2x2 PNG, so that "Try it out" in /docs and schema fuzzers send a decodable image.
EXAMPLE_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="
)

CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "method": {"type": "string", "enum": ["vanilla", "equitune", "equizero", "lambda"]},
                        "top_k": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "default: 5, or the number of labels if fewer",
                        },
                        "labels": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "zero-shot models: repeat the field, or send one JSON list",
                        },
                    },
                },
                "encoding": {"image": {"contentType": "image/*"}},
            },
            "application/json": {
                "schema": inline_definitions(ClassifyJSON.model_json_schema()),
                "examples": {
                    "fixed labels": {"value": {"images": [{"b64": EXAMPLE_PNG_B64}], "method": "lambda", "top_k": 3}},
                    "zero-shot": {
                        "value": {
                            "images": [{"b64": EXAMPLE_PNG_B64}],
                            "method": "equizero",
                            "top_k": 2,
                            "labels": ["cat", "dog", "espresso"],
                        }
                    },
                },
            },
        },
    }
}


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health/live", response_model=Health, tags=["health"])
    @router.get("/v2/health/live", response_model=Health, tags=["health"], include_in_schema=False)
    async def live() -> Health:
        return Health(status="ok")

    @router.get("/health/ready", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    @router.get("/v2/health/ready", response_model=Health, tags=["health"], include_in_schema=False)
    async def ready(request: Request) -> Response:
        engine = engine_of(request)
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not engine.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/v1/models", response_model=ModelList, tags=["models"])
    async def models(request: Request) -> ModelList:
        cards = []
        for name, loaded in engine_of(request).models.items():
            backbone = loaded.backbone
            cards.append(
                ModelCard(
                    name=name,
                    task=loaded.spec.task,
                    backbone=backbone.name,
                    group=loaded.spec.group,
                    transforms=loaded.transforms,
                    methods=[m.value for m in loaded.spec.methods],
                    default_method=loaded.spec.default_method.value,
                    num_labels=None if backbone.zero_shot else len(backbone.labels),
                    zero_shot=backbone.zero_shot,
                    lambda_trained=loaded.lambda_trained,
                    device=loaded.device.type,
                    dtype=str(loaded.dtype).removeprefix("torch."),
                    runtime=loaded.runtime,
                    input_size=backbone.input_size,
                    description=loaded.spec.description,
                )
            )
        text_engine = getattr(request.app.state, "text_engine", None)  # language models (task generate)
        cards += [ModelCard(**card) for card in (text_engine.cards() if text_engine is not None else [])]
        return ModelList(models=cards)

    @router.post(
        "/v1/models/{name}/classify",
        response_model=ClassifyResponse,
        response_model_by_alias=True,
        tags=["inference"],
        dependencies=[Depends(require_api_key)],
        responses=ERRORS,
        openapi_extra=CLASSIFY_BODY,
        summary="Classify images with an equivariant model",
    )
    async def classify(name: str, request: Request) -> Response:
        engine = engine_of(request)
        engine.check_accepting()
        loaded = engine.get_model(name)
        # Shed before reading the body, and again (with the image count) before decoding: under
        # overload, parsing and decoding what will be refused anyway starves the accepted
        # requests and makes the 429 itself slow.
        engine.check_capacity(name, 1)
        settings = settings_of(request)
        # Announced from here on: a batch forming now may wait for this request's images.
        arrival = engine.announce(name)
        try:
            payloads, method, top_k, labels = await read_classify_request(request, settings)
            engine.check_capacity(name, len(payloads), arrival)
            images = await asyncio.gather(
                *(
                    run_in_threadpool(
                        decode_image,
                        data,
                        max_pixels=settings.max_pixels,
                        min_side=loaded.backbone.input_size,
                        content_type=content_type,
                    )
                    for data, content_type in payloads
                )
            )
            output = await until_disconnected(
                request,
                engine.classify(
                    name,
                    images,
                    method=method,
                    top_k=top_k,
                    labels=labels,
                    request_id=request.state.request_id,
                    arrival=arrival,
                ),
            )
        finally:
            arrival.close()
        return JSONResponse(classify_response(output))

    @router.get("/metrics", tags=["metrics"], response_class=Response)
    async def metrics(request: Request) -> Response:
        if settings_of(request).protect_metrics:
            require_api_key(request)
        return Response(engine_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router


async def read_classify_request(
    request: Request, settings: Settings
) -> tuple[list[tuple[bytes, str | None]], str | None, int | None, list[str] | None]:
    """Parse multipart or JSON into (images as (bytes, content type), method, top_k, labels)."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(
                max_files=settings.max_images, max_fields=settings.max_labels + 8, max_part_size=settings.max_body_bytes
            )
        except StarletteHTTPException as exc:  # starlette's multipart limits and parse errors
            if "Too many files" in exc.detail:
                raise TooLarge(f"more than {settings.max_images} images in one request (EQUISERVE_MAX_IMAGES)") from exc
            if "Too many fields" in exc.detail:
                raise TooLarge(f"more than {settings.max_labels} labels in one request (EQUISERVE_MAX_LABELS)") from exc
            raise MalformedBody(f"malformed multipart body: {exc.detail}") from exc
        files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
        if len(files) > settings.max_images:
            raise TooLarge(f"more than {settings.max_images} images in one request (EQUISERVE_MAX_IMAGES)")
        if not files:
            raise InvalidInput("send one or more files in the form field 'image'")
        payloads = []
        for f in files:
            check_content_type(f.content_type)
            payloads.append((await f.read(), f.content_type))
        method = form.get("method")
        top_k = parse_int(form.get("top_k"), "top_k")
        raw_labels = [v for v in form.getlist("labels") if isinstance(v, str)]
        labels = parse_labels(raw_labels)
        return payloads, method if isinstance(method, str) and method else None, top_k, labels
    if content_type.startswith("application/json") or not content_type:
        try:
            body = ClassifyJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            raise InvalidInput(f"invalid JSON body: {validation_message(exc.errors())}") from exc
        if len(body.images) > settings.max_images:
            raise TooLarge(f"more than {settings.max_images} images in one request (EQUISERVE_MAX_IMAGES)")
        payloads = [(decode_base64(img.b64, settings.max_body_bytes), None) for img in body.images]
        return payloads, body.method, body.top_k, body.labels
    raise UnsupportedMediaTypeBody(f"send multipart/form-data or application/json, not {content_type!r}")


class MalformedBody(EngineError):
    status, code = 400, "malformed_body"


class UnsupportedMediaTypeBody(EngineError):
    status, code = 415, "unsupported_media_type"


def parse_int(value: object, field: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(str(value))
    except ValueError as exc:
        raise InvalidInput(f"{field} must be an integer") from exc


def parse_labels(values: list[str]) -> list[str] | None:
    """Labels from a form: a repeated field, or one field holding a JSON list."""
    if not values:
        return None
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except json.JSONDecodeError as exc:
            raise InvalidInput("labels: invalid JSON list") from exc
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise InvalidInput("labels must be a JSON list of strings")
        return parsed
    return values


def validation_message(errors: Sequence[Any]) -> str:
    """The first few pydantic errors as one line: ``field: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in list(errors)[:5])


async def until_disconnected(request: Request, work: Any) -> ClassifyOutput:
    """Await ``work`` unless the client disconnects first; then cancel it (its queued images
    are dropped before the forward pass) and stop."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
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


class ClientDisconnected(EngineError):
    status, code = 499, "client_closed_request"


async def wait_for_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def classify_response(output: ClassifyOutput) -> dict[str, Any]:
    return {
        "model": output.model,
        "method": output.method.value,
        "group": output.group,
        "results": [
            {
                "predictions": [{"label": p.label, "index": p.index, "score": p.score} for p in r.predictions],
                "transforms": [
                    {"name": t.name, "lambda": t.weight, "top_label": t.top_label, "top_score": t.top_score}
                    for t in r.transforms
                ],
                "selected_transform": r.selected_transform,
                "lambda_entropy": r.lambda_entropy,
            }
            for r in output.results
        ],
        "timing": {
            "queue_ms": output.queue_s * 1000,
            "inference_ms": output.inference_s * 1000,
            "batch_size": output.batch_size,
        },
    }

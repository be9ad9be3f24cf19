"""``POST /v1/models/{name}/classify``: multipart or JSON images in, invariant labels out.

The route parses the body into a ``ClassifyRequest`` of encoded images and hands it to the
engine, which admits, decodes, batches and answers. The body is read only once the engine
admitted the request: under overload a 429 costs no parsing.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import Settings
from app.engine.errors import InvalidInput, TooLarge
from app.equivariance import METHOD_NAMES
from app.tasks.classify.decode import check_content_type, decode_base64
from app.tasks.classify.messages import ClassifyOutput, ClassifyRequest, EncodedImage

from .common import (
    engine_of,
    error_responses,
    inline_definitions,
    require_api_key,
    settings_of,
    timing_body,
    until_disconnected,
)
from .errors import MalformedBody, UnsupportedBody, validation_message
from .schemas import ClassifyJSON, ClassifyResponse

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
                        "method": {"type": "string", "enum": list(METHOD_NAMES)},
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

ERRORS = error_responses(
    e400="undecodable image, invalid base64 or malformed body",
    e413="body, pixels, images or labels over the limits",
    e415="not an image, or a body that is neither multipart nor JSON",
    e422="invalid fields (method, top_k, labels, schema)",
)


def build_classify_router() -> APIRouter:
    router = APIRouter()

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
        engine, settings = engine_of(request), settings_of(request)
        output = await until_disconnected(
            request,
            lambda body: engine.infer(name, "classify", body, request_id=request.state.request_id),
            lambda: read_classify_request(request, settings),
        )
        return JSONResponse(classify_response(output))

    return router


async def read_classify_request(request: Request, settings: Settings) -> ClassifyRequest:
    """Parse a multipart or JSON body; the images stay encoded (the engine decodes them)."""
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
        images = []
        for f in files:
            check_content_type(f.content_type)  # before reading the part: a text file is refused as is
            images.append(EncodedImage(await f.read(), f.content_type))
        method = form.get("method")
        labels = parse_labels([v for v in form.getlist("labels") if isinstance(v, str)])
        return ClassifyRequest(
            images,
            method if isinstance(method, str) and method else None,
            parse_int(form.get("top_k"), "top_k"),
            labels,
        )
    if content_type.startswith("application/json"):
        try:
            body = ClassifyJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            raise InvalidInput(f"invalid JSON body: {validation_message(list(exc.errors()))}") from exc
        if len(body.images) > settings.max_images:
            raise TooLarge(f"more than {settings.max_images} images in one request (EQUISERVE_MAX_IMAGES)")
        images = [EncodedImage(decode_base64(img.b64, settings.max_body_bytes)) for img in body.images]
        return ClassifyRequest(images, body.method, body.top_k, body.labels)
    shown = f"not {content_type!r}" if content_type else "with a Content-Type header"
    raise UnsupportedBody(f"send multipart/form-data or application/json, {shown}")


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
        "timing": timing_body(output.timing),
    }

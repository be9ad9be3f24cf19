"""How classify speaks HTTP: ``POST /v1/models/{name}/classify`` takes a multipart form (``image``
files, ``method``, ``top_k``, ``labels``) or JSON (base64 images); the Open Inference Protocol
takes ``image`` (BYTES) or ``pixels`` (FP32) tensors. The images stay encoded here: the engine
decodes them in its preprocessing pool, after admission. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import ConfigDict, Field
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from app.backbones.images import check_content_type, decode_base64
from app.equivariance import METHOD_NAMES
from app.errors import InvalidInput, MalformedBody, TooLarge, UnsupportedBody
from app.oip import InferBody, Tensor, TensorError, TensorSpec, V2Mapping, checked_inputs, parameter, text_element
from app.tasks.http import Served, TaskHttp, body_schema, inline_definitions, parse_json

from .messages import ClassifyOutput, ClassifyRequest, EncodedImage, Pixels

# A real 2x2 PNG, so that "Try it out" in /docs and schema fuzzers send a decodable image.
EXAMPLE_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="
)
METHOD = "vanilla | equitune | equizero | lambda (default: the model's)"


@dataclass(frozen=True)
class ImagePayload:
    __pydantic_config__ = ConfigDict(extra="forbid")

    b64: Annotated[str, Field(description="the image file (JPEG, PNG, WebP, GIF, BMP, TIFF), base64-encoded")]


@dataclass(frozen=True)
class ClassifyJSON:
    """The JSON form of a classify request (the multipart form takes the same fields)."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    images: Annotated[list[ImagePayload], Field(min_length=1)]
    method: Annotated[str | None, Field(description=METHOD)] = None
    top_k: Annotated[
        int | None, Field(description="predictions per image (default: 5, or the number of labels if fewer)")
    ] = None
    labels: Annotated[list[str] | None, Field(description="zero-shot models: the label set to choose from")] = None


class ClassifyV2(V2Mapping):
    """``image`` (BYTES [B], encoded files; base64 strings in JSON) or ``pixels`` (FP32
    [B, 3, H, W] in [0, 1]; cropped and resized like a decoded file); ``labels`` (BYTES [K])
    for zero-shot models. Outputs: every label's probability, each copy's weight and top
    label, and the top ``top_k``."""

    parameters = frozenset({"method", "top_k"})

    def inputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        specs = list(IMAGE_INPUTS)
        if card["zero_shot"]:
            specs.append(TensorSpec("labels", "BYTES", (-1,)))
        return specs

    def outputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        labels = card["num_labels"] or -1  # zero-shot: as many as the request's labels
        copies = len(card["transforms"])
        return [
            TensorSpec("probabilities", "FP32", (-1, labels)),
            TensorSpec("lambda", "FP32", (-1, copies)),
            TensorSpec("copy_top_index", "INT64", (-1, copies)),
            TensorSpec("top_index", "INT64", (-1, -1)),
            TensorSpec("top_probability", "FP32", (-1, -1)),
            TensorSpec("top_label", "BYTES", (-1, -1)),
        ]

    def request(self, body: InferBody, card: dict[str, Any], limits: Any, wanted: set[str]) -> ClassifyRequest:
        self.check_parameters(body)
        tensors = {t.name: t for t in checked_inputs(body, {s.name: s for s in self.inputs(card)})}
        images = images_from_tensors(tensors)
        labels = None
        if "labels" in tensors:
            labels = [text_element(e, "labels") for e in tensors["labels"].data]
        return ClassifyRequest(
            images,
            parameter(body, "method", str),
            parameter(body, "top_k", int),
            labels,
            probabilities="probabilities" in wanted,
        )

    def tensors(self, output: ClassifyOutput) -> dict[str, tuple[str, np.ndarray]]:
        results = output.results
        tensors: dict[str, tuple[str, np.ndarray]] = {
            "lambda": ("FP32", np.array([[t.weight for t in r.transforms] for r in results], np.float32)),
            "copy_top_index": ("INT64", np.array([[t.top_index for t in r.transforms] for r in results], np.int64)),
            "top_index": ("INT64", np.array([[p.index for p in r.predictions] for r in results], np.int64)),
            "top_probability": ("FP32", np.array([[p.score for p in r.predictions] for r in results], np.float32)),
            "top_label": ("BYTES", np.array([[p.label.encode() for p in r.predictions] for r in results], object)),
        }
        if all(r.probabilities is not None for r in results):
            tensors["probabilities"] = ("FP32", np.stack([r.probabilities for r in results]).astype(np.float32))
        return tensors


class ClassifyHttp(TaskHttp[ClassifyRequest, ClassifyOutput]):
    task = "classify"
    summary = "Classify images with an equivariant model"
    answer_type = ClassifyOutput
    errors: ClassVar[dict[int, str]] = {
        400: "undecodable image, invalid base64 or malformed body",
        413: "body, pixels, images or labels over the limits",
        415: "not an image, or a body that is neither multipart nor JSON",
        422: "invalid fields (method, top_k, labels, schema)",
    }
    v2 = ClassifyV2()

    async def read(self, request: Request, served: Served) -> ClassifyRequest:
        """A multipart or JSON body; the images stay encoded (the engine decodes them)."""
        limits = served.limits
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            return await read_form(request, limits, served.max_body_bytes)
        if content_type.startswith("application/json"):
            body: ClassifyJSON = parse_json(ClassifyJSON, await request.body())
            check_image_count(len(body.images), limits.max_images)
            images = [EncodedImage(decode_base64(img.b64, served.max_body_bytes)) for img in body.images]
            return ClassifyRequest(images, body.method, body.top_k, body.labels)
        shown = f"not {content_type!r}" if content_type else "with a Content-Type header"
        raise UnsupportedBody(f"send multipart/form-data or application/json, {shown}")

    def openapi_body(self) -> dict[str, Any]:
        return image_body(
            {
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
            ClassifyJSON,
            {
                "fixed labels": {"images": [{"b64": EXAMPLE_PNG_B64}], "method": "lambda", "top_k": 3},
                "zero-shot": {
                    "images": [{"b64": EXAMPLE_PNG_B64}],
                    "method": "equizero",
                    "top_k": 2,
                    "labels": ["cat", "dog", "espresso"],
                },
            },
        )


def image_body(fields: dict[str, Any], json_type: type, examples: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route taking image files: a multipart form (``image`` files
    and ``fields``) or JSON (``json_type``, base64 images), with JSON ``examples`` by name."""
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        **fields,
                    },
                },
                "encoding": {"image": {"contentType": "image/*"}},
            },
            "application/json": {
                "schema": inline_definitions(body_schema(json_type)),
                "examples": {name: {"value": value} for name, value in examples.items()},
            },
        },
    }


def check_image_count(count: int, max_images: int, task: str = "classify") -> None:
    if count > max_images:
        raise TooLarge(f"more than {max_images} images in one request (EQUISERVE_{task.upper()}_MAX_IMAGES)")


async def read_image_form(
    request: Request,
    max_images: int,
    max_fields: int,
    max_body_bytes: int,
    too_many_fields: str,
    task: str = "classify",
) -> tuple[list[EncodedImage], FormData]:
    """A multipart form's ``image`` files (still encoded) and the form, under the limits."""
    try:
        form = await request.form(max_files=max_images, max_fields=max_fields, max_part_size=max_body_bytes)
    except StarletteHTTPException as exc:  # starlette's multipart limits and parse errors
        if "Too many files" in exc.detail:
            check_image_count(max_images + 1, max_images, task)
        if "Too many fields" in exc.detail:
            raise TooLarge(too_many_fields) from exc
        raise MalformedBody(f"malformed multipart body: {exc.detail}") from exc
    files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
    check_image_count(len(files), max_images, task)
    if not files:
        raise InvalidInput("send one or more files in the form field 'image'")
    images = []
    for f in files:
        check_content_type(f.content_type)  # before reading the part: a text file is refused as is
        images.append(EncodedImage(await f.read(), f.content_type))
    return images, form


def form_text(form: FormData, field: str) -> str | None:
    value = form.get(field)
    return value if isinstance(value, str) and value else None


async def read_form(request: Request, limits: Any, max_body_bytes: int) -> ClassifyRequest:
    images, form = await read_image_form(
        request,
        limits.max_images,
        limits.max_labels + 8,
        max_body_bytes,
        f"more than {limits.max_labels} labels in one request (EQUISERVE_CLASSIFY_MAX_LABELS)",
    )
    labels = parse_labels([v for v in form.getlist("labels") if isinstance(v, str)])
    return ClassifyRequest(images, form_text(form, "method"), parse_int(form.get("top_k"), "top_k"), labels)


def images_from_tensors(tensors: dict[str, Tensor]) -> list[EncodedImage | Pixels]:
    """The v2 inputs ``image`` (BYTES [B]: files; base64 strings in JSON) or ``pixels`` (FP32 [B, 3, H, W])."""
    if ("image" in tensors) == ("pixels" in tensors):
        raise TensorError("send exactly one of the inputs 'image' (BYTES [B]) and 'pixels' (FP32 [B, 3, H, W])")
    if "pixels" in tensors:
        return [Pixels(p) for p in tensors["pixels"].data]
    image = tensors["image"]
    if image.binary:
        return [EncodedImage(e) for e in image.data]
    # JSON strings cannot carry raw bytes: the files are base64; the body limit bounds them
    return [EncodedImage(decode_base64(e, len(e))) for e in image.data]


IMAGE_INPUTS = (TensorSpec("image", "BYTES", (-1,)), TensorSpec("pixels", "FP32", (-1, 3, -1, -1)))


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
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidInput("labels: invalid JSON list") from exc
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise InvalidInput("labels must be a JSON list of strings")
        return parsed
    return values


HTTP = ClassifyHttp()

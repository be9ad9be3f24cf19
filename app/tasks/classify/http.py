"""How classify speaks HTTP: ``POST /v1/models/{name}/classify`` takes a multipart form (``image``
files, ``method``, ``top_k``, ``labels``) or JSON (base64 images); the Open Inference Protocol
takes ``image`` (BYTES) or ``pixels`` (FP32) tensors. The images stay encoded here: the engine
decodes them in its preprocessing pool, after admission. No torch here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import ConfigDict, Field
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from app.backbones.images import check_content_type, decode_base64
from app.equivariance import METHOD_NAMES
from app.errors import InvalidInput, MalformedBody, TooLarge, UndecodableImage, UnsupportedBody
from app.oip import (
    InferBody,
    Tensor,
    TensorError,
    TensorSchema,
    TensorSpec,
    V2Mapping,
    checked_inputs,
    parameter,
    text_element,
)
from app.tasks.http import (
    WHITESPACE,
    Served,
    TaskHttp,
    body_schema,
    constrained,
    inline_definitions,
    method_keywords,
    parse_json,
)
from app.tasks.jsontypes import INTEGRAL

from .messages import ClassifyOutput, ClassifyRequest, EncodedImage, Pixels

# A real 2x2 PNG, so that "Try it out" in /docs and schema fuzzers send a decodable image.
EXAMPLE_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="
)
METHOD = "vanilla | equitune | equizero | lambda (default: the model's)"
# Padded base64 (RFC 4648), as the OpenAPI schema states it; checked here, before decode_base64,
# whose padding rules differ between Python versions (3.11 takes "AAAA=", 3.10 does not).
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
BASE64 = re.compile(BASE64_PATTERN.removesuffix("$") + r"\Z")  # no newline after it either


def decode_image_base64(text: str, max_bytes: int) -> bytes:
    """An image sent as base64 text; 400 (``UndecodableImage``) unless it is padded base64."""
    if not BASE64.match(text):
        raise UndecodableImage("invalid base64: send padded base64 (RFC 4648: A-Z a-z 0-9 + /, '=' at the end)")
    return decode_base64(text, max_bytes)


@dataclass(frozen=True)
class ImagePayload:
    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)

    b64: Annotated[
        str,
        Field(
            description="the image file (JPEG, PNG, WebP, GIF, BMP, TIFF), base64-encoded",
            json_schema_extra={"pattern": BASE64_PATTERN, "contentEncoding": "base64", "contentMediaType": "image/*"},
        ),
    ]


@dataclass(frozen=True)
class ClassifyJSON:
    """The JSON form of a classify request (the multipart form takes the same fields)."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)

    images: Annotated[list[ImagePayload], Field(min_length=1)]
    method: Annotated[str | None, Field(description=METHOD)] = None
    top_k: Annotated[
        int | None, Field(description="predictions per image (default: 5, or the number of labels if fewer)"), INTEGRAL
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

    def required_inputs(self, card: dict[str, Any]) -> list[tuple[str, ...]]:
        return [("image", "pixels")]

    def input_schema(self, spec: TensorSpec, card: dict[str, Any], limits: Any) -> TensorSchema:
        if spec.name == "labels":
            labels = label_list(limits)
            return TensorSchema([{"type": "integer", "minimum": 1, "maximum": labels["maxItems"]}], labels["items"])
        return image_tensor_schema(spec, limits) or super().input_schema(spec, card, limits)

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
        422: "invalid fields (method, top_k, labels, an unknown form field, schema)",
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
            images = [EncodedImage(decode_image_base64(img.b64, served.max_body_bytes)) for img in body.images]
            return ClassifyRequest(images, body.method, body.top_k, body.labels)
        shown = f"not {content_type!r}" if content_type else "with a Content-Type header"
        raise UnsupportedBody(f"send multipart/form-data or application/json, {shown}")

    def openapi_body(self, served: Served | None = None) -> dict[str, Any]:
        examples = {
            "fixed labels": {"images": [{"b64": EXAMPLE_PNG_B64}], "method": "lambda", "top_k": 3},
            "zero-shot": {
                "images": [{"b64": EXAMPLE_PNG_B64}],
                "method": "equizero",
                "top_k": 2,
                "labels": ["cat", "dog", "espresso"],
            },
        }
        json_schema = inline_definitions(body_schema(ClassifyJSON))
        if served is None:
            fields: dict[str, Any] = {
                "method": {"type": "string", "enum": list(METHOD_NAMES)},
                "top_k": {"type": "integer", "minimum": 1, "description": "default: 5, or the labels if fewer"},
                "labels": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "zero-shot models: repeat the field, or send one JSON list",
                },
            }
            return image_body(fields, json_schema, examples, None)
        limits, card = served.limits, served.card
        zero_shot = bool(card["zero_shot"])
        # top_k's largest value: the labels; a zero-shot request's own labels bound it too, which
        # JSON Schema cannot compare (a 422 above them)
        most = limits.max_labels if zero_shot else card["num_labels"]
        top_k = {"minimum": 1, "maximum": most}
        labels: dict[str, Any] = (
            label_list(limits) if zero_shot else {"type": "null", "description": "this model's labels are fixed"}
        )
        json_schema = constrained(
            json_schema,
            images={"maxItems": served.max_items(limits.max_images)},
            method=method_keywords(served),
            top_k=top_k,
        )
        json_schema["properties"]["labels"] = labels
        fields = {
            "method": form_choice(list(card["methods"])),
            "top_k": form_integer(top_k),
        }
        if zero_shot:
            fields["labels"] = {**labels, "description": "repeat the field, or send one JSON list"}
        name = "zero-shot" if zero_shot else "fixed labels"
        example = {**examples[name], "method": served.method(str(examples[name]["method"]))}
        example["top_k"] = min(int(example["top_k"]), most)
        return image_body(fields, json_schema, {name: example}, served.max_items(limits.max_images))


def label_list(limits: Any) -> dict[str, Any]:
    """A zero-shot request's labels: each non-blank and at most ``max_label_chars`` once stripped
    (as the model strips them), distinct (once stripped: JSON Schema compares them as sent)."""
    n = limits.max_label_chars
    blank = f"[{WHITESPACE}]*"
    stripped = f"[^{WHITESPACE}]" + (f"(?:[\\s\\S]{{0,{n - 2}}}[^{WHITESPACE}])?" if n > 1 else "")
    return {
        "type": "array",
        "items": {"type": "string", "pattern": f"^{blank}{stripped}{blank}$"},
        "minItems": 1,
        "maxItems": limits.max_labels,
        "uniqueItems": True,
        "description": "the label set to choose from",
    }


def form_choice(choices: list[str]) -> dict[str, Any]:
    """A form field of ``choices``; empty (as a form may send it) means the default."""
    return {"type": "string", "enum": [*choices, ""], "description": "empty or absent: the model's default"}


def form_integer(keywords: dict[str, Any]) -> dict[str, Any]:
    """An integer form field; empty (as a form may send it) means the default."""
    return {"anyOf": [{"type": "integer", **keywords}, {"type": "string", "enum": [""]}]}


def image_body(
    fields: dict[str, Any], json_schema: dict[str, Any], examples: dict[str, Any], max_images: int | None
) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route taking image files: a multipart form (``image`` files
    and ``fields``; no other field) or JSON (``json_schema``, base64 images), with JSON
    ``examples`` by name; ``max_images``: a model's limit (None: any model's)."""
    files: dict[str, Any] = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
    if max_images is not None:
        files["maxItems"] = max_images
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": files, **fields},
                    "additionalProperties": False,
                },
                "encoding": {"image": {"contentType": "image/*"}},
            },
            "application/json": {
                "schema": {**json_schema, "examples": list(examples.values())},
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
    fields: tuple[str, ...] = ("method",),
) -> tuple[list[EncodedImage], FormData]:
    """A multipart form's ``image`` files (still encoded) and the form, under the limits; a field
    other than ``image`` and ``fields`` is refused, as an unknown JSON field is."""
    try:
        form = await request.form(max_files=max_images, max_fields=max_fields, max_part_size=max_body_bytes)
    except StarletteHTTPException as exc:  # starlette's multipart limits and parse errors
        if "Too many files" in exc.detail:
            check_image_count(max_images + 1, max_images, task)
        if "Too many fields" in exc.detail:
            raise TooLarge(too_many_fields) from exc
        raise MalformedBody(f"malformed multipart body: {exc.detail}") from exc
    unknown = sorted(set(form.keys()) - {"image", *fields})
    if unknown:
        raise InvalidInput(f"unknown form field {unknown[0]!r}; this route takes image, {', '.join(fields)}")
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
        fields=("method", "top_k", "labels"),
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
    return [EncodedImage(decode_image_base64(e, len(e))) for e in image.data]


IMAGE_INPUTS = (TensorSpec("image", "BYTES", (-1,)), TensorSpec("pixels", "FP32", (-1, 3, -1, -1)))


def image_tensor_schema(spec: TensorSpec, limits: Any) -> TensorSchema | None:
    """The inputs ``image`` and ``pixels`` of a model with these limits: 1 to ``max_images`` images
    (base64 files; or pixels of at most ``max_pixels`` each, which a shape cannot multiply out)."""
    count = {"type": "integer", "minimum": 1, "maximum": limits.max_images}
    if spec.name == "image":
        return TensorSchema([count], {"type": "string", "pattern": BASE64_PATTERN, "contentEncoding": "base64"})
    if spec.name == "pixels":
        side = {"type": "integer", "minimum": 1, "maximum": limits.max_pixels}
        return TensorSchema([count, {"const": 3}, side, side], {"type": "number"})
    return None


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

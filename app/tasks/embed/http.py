"""How embed speaks HTTP: ``POST /v1/models/{name}/embed`` takes a multipart form (``image`` files,
``method``) or JSON (``{"images": [{"b64": ...}], "method": ...}``); the Open Inference Protocol
takes ``image`` (BYTES) or ``pixels`` (FP32) and gives ``embedding`` (FP32 [B, D]) and
``lambda``. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import ConfigDict, Field
from starlette.requests import Request

from app.errors import UnsupportedBody
from app.oip import InferBody, TensorSchema, TensorSpec, V2Mapping, checked_inputs, parameter
from app.tasks.classify.http import (
    EXAMPLE_PNG_B64,
    IMAGE_INPUTS,
    ImagePayload,
    check_image_count,
    decode_image_base64,
    form_choice,
    form_text,
    image_body,
    image_tensor_schema,
    images_from_tensors,
    read_image_form,
)
from app.tasks.classify.messages import EncodedImage
from app.tasks.http import Served, TaskHttp, body_schema, constrained, inline_definitions, method_keywords, parse_json

from .messages import EMBED_METHODS, EmbedOutput, EmbedRequest


@dataclass(frozen=True)
class EmbedJSON:
    """The JSON form of an embed request (the multipart form takes the same fields)."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)

    images: Annotated[list[ImagePayload], Field(min_length=1)]
    method: Annotated[str | None, Field(description="vanilla | equitune | lambda (default: the model's)")] = None


class EmbedV2(V2Mapping):
    """``image`` or ``pixels`` as for classify -> ``embedding`` FP32 [B, D] and ``lambda`` FP32 [B, |G|]."""

    parameters = frozenset({"method"})

    def inputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        return list(IMAGE_INPUTS)

    def required_inputs(self, card: dict[str, Any]) -> list[tuple[str, ...]]:
        return [("image", "pixels")]

    def input_schema(self, spec: TensorSpec, card: dict[str, Any], limits: Any) -> TensorSchema:
        return image_tensor_schema(spec, limits) or super().input_schema(spec, card, limits)

    def outputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        return [
            TensorSpec("embedding", "FP32", (-1, card["embedding_dim"])),
            TensorSpec("lambda", "FP32", (-1, len(card["transforms"]))),
        ]

    def request(self, body: InferBody, card: dict[str, Any], limits: Any, wanted: set[str]) -> EmbedRequest:
        self.check_parameters(body)
        tensors = {t.name: t for t in checked_inputs(body, {s.name: s for s in self.inputs(card)})}
        return EmbedRequest(images_from_tensors(tensors), parameter(body, "method", str))

    def tensors(self, output: EmbedOutput) -> dict[str, tuple[str, np.ndarray]]:
        return {
            "embedding": ("FP32", np.stack([r.vector for r in output.results]).astype(np.float32)),
            "lambda": ("FP32", np.array([[t.weight for t in r.transforms] for r in output.results], np.float32)),
        }


class EmbedHttp(TaskHttp[EmbedRequest, EmbedOutput]):
    task = "embed"
    summary = "Embed images invariantly (the λ-weighted features of the transformed copies)"
    answer_type = EmbedOutput
    errors: ClassVar[dict[int, str]] = {
        400: "undecodable image, invalid base64 or malformed body",
        413: "body, pixels or images over the limits",
        415: "not an image, or a body that is neither multipart nor JSON",
        422: "invalid fields (method, an unknown form field, schema)",
    }
    v2 = EmbedV2()

    async def read(self, request: Request, served: Served) -> EmbedRequest:
        limits = served.limits
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            images, form = await read_image_form(
                request,
                limits.max_images,
                8,
                served.max_body_bytes,
                "too many form fields: send image and method",
                "embed",
            )
            return EmbedRequest(images, form_text(form, "method"))
        if content_type.startswith("application/json"):
            body: EmbedJSON = parse_json(EmbedJSON, await request.body())
            check_image_count(len(body.images), limits.max_images, "embed")
            images = [EncodedImage(decode_image_base64(img.b64, served.max_body_bytes)) for img in body.images]
            return EmbedRequest(images, body.method)
        shown = f"not {content_type!r}" if content_type else "with a Content-Type header"
        raise UnsupportedBody(f"send multipart/form-data or application/json, {shown}")

    def openapi_body(self, served: Served | None = None) -> dict[str, Any]:
        example = {"images": [{"b64": EXAMPLE_PNG_B64}], "method": "lambda"}
        json_schema = inline_definitions(body_schema(EmbedJSON))
        if served is None:
            fields = {"method": {"type": "string", "enum": [m.value for m in EMBED_METHODS]}}
            return image_body(fields, json_schema, {"an image": example}, None)
        max_images = served.max_items(served.limits.max_images)
        json_schema = constrained(json_schema, images={"maxItems": max_images}, method=method_keywords(served))
        example["method"] = served.method("lambda")
        fields = {"method": form_choice(list(served.card["methods"]))}
        return image_body(fields, json_schema, {"an image": example}, max_images)


HTTP = EmbedHttp()

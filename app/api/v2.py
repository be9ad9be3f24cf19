"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) over the same engine.

``GET /v2`` (server metadata), ``GET /v2/models/{name}[/versions/1]`` (model metadata),
``.../ready`` and ``POST .../infer`` for classify and generate models; the health routes are
``app.api.routes``'. Tensors come as JSON (``data``) or with the binary tensor data extension
(a JSON header of ``Inference-Header-Content-Length`` bytes, then each tensor's raw bytes in
order; ``BYTES`` elements as a 4-byte little-endian length and the bytes). Outputs are JSON
unless ``binary_data_output`` (request) or ``binary_data`` (per output) asks for raw bytes.

The request becomes the task's request object and goes through ``engine.infer`` like a /v1
request (admission before the body is read, batching, deadlines, cancellation), so both
protocols share the batcher and answer alike. Errors are the protocol's ``{"error": message}``:
400 for a bad tensor or field, and the engine's statuses otherwise (404, 413, 429, 503, 504).
No torch here: the tensors are numpy arrays.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from app.config import Settings
from app.engine.errors import EngineError, ModelNotFound, NotReady, QueueFull
from app.tasks.classify.decode import decode_base64
from app.tasks.classify.messages import ClassifyOutput, ClassifyRequest, EncodedImage, Pixels
from app.tasks.generate.messages import GenerateOutput, GenerateRequest

from .classify import EXAMPLE_PNG_B64
from .common import engine_of, inline_definitions, require_api_key, settings_of, until_disconnected
from .errors import STATUS, ApiError, UnsupportedBody
from .middleware import BodyTooLarge

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 8  # dimensions of an input tensor (the models take at most 4)
VERSION = "1"  # a model folder holds one version
# Triton's reserved request parameters that mean nothing here: accepted and ignored (the
# server's deadline, EQUISERVE_REQUEST_TIMEOUT_S, applies; there is no priority queue).
IGNORED_PARAMETERS = frozenset({"binary_data_output", "priority", "timeout"})
# The protocol's clients expect 400 for a request they got wrong, whichever field it was.
V2_STATUS = {**STATUS, "invalid_input": 400, "unsupported_media_type": 400}

NUMERIC: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
        "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
    }.items()
}  # fmt: skip
# The numpy kinds a JSON ``data`` list may parse to, per datatype kind (ints are fine for floats).
JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
TYPE_WORDS = {(str,): "a string", (int,): "an integer", (int, float): "a number", (bool,): "true/false"}


class TensorError(ApiError):
    """A tensor or field of a v2 request that does not fit the protocol or the model."""

    status, code = 400, "invalid_tensor"


# -- tensors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """An input tensor: numbers as a shaped numpy array; BYTES as a shaped object array of
    ``bytes`` (binary) or ``str`` (JSON ``data``)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    binary: bool


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferBody:
    id: str | None
    inputs: dict[str, Tensor]
    parameters: dict[str, Any]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a model, as ``GET /v2/models/{name}`` lists it (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def parse_infer_body(body: bytes, header_length: str | None) -> InferBody:
    """The JSON header and, with the binary extension, the raw tensor bytes after it."""
    if header_length is None:
        header, rest = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()) or not 0 < int(header_length) <= len(body):
            raise TensorError(f"{HEADER_LENGTH} must be between 1 and the body's {len(body)} bytes")
        header, rest = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(header)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise TensorError(f"the inference request is not valid JSON (or nested too deeply): {exc}") from exc
    if not isinstance(request, dict):
        raise TensorError("the inference request must be a JSON object")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorError("'id' must be a string")
    parameters = _parameters(request.get("parameters"), "the request")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise TensorError("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, Tensor] = {}
    offset = 0
    for raw in raw_inputs:
        tensor, offset = _input_tensor(raw, rest, offset)
        if tensor.name in inputs:
            raise TensorError(f"input {tensor.name!r} appears twice")
        inputs[tensor.name] = tensor
    if offset != len(rest):
        raise TensorError(f"{len(rest) - offset} bytes of binary data after the last tensor's binary_data_size")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise TensorError("'binary_data_output' must be true or false")
    raw_outputs = request.get("outputs")
    outputs = None if raw_outputs in (None, []) else _requested_outputs(raw_outputs, binary_output)
    return InferBody(request_id, inputs, parameters, outputs, binary_output)


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TensorError(f"the parameters of {where} must be a JSON object")
    return value


def _input_tensor(raw: Any, rest: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise TensorError("every input must be an object with a 'name'")
    name, datatype, shape = raw["name"], raw.get("datatype"), raw.get("shape")
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in NUMERIC):
        raise TensorError(f"input {name!r}: unknown datatype {datatype!r}; choose from {[*NUMERIC, 'BYTES']}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise TensorError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise TensorError(f"input {name!r}: {len(shape)} dimensions; at most {MAX_RANK}")
    size = math.prod(shape)
    parameters = _parameters(raw.get("parameters"), f"input {name!r}")
    binary_size = parameters.get("binary_data_size")
    if binary_size is not None:
        if "data" in raw:
            raise TensorError(f"input {name!r} has both 'data' and binary_data_size")
        if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
            raise TensorError(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + binary_size > len(rest):
            raise TensorError(f"input {name!r}: binary_data_size {binary_size} runs past the end of the body")
        chunk = rest[offset : offset + binary_size]
        data = (
            _bytes_elements(name, chunk, size) if datatype == "BYTES" else _binary_numbers(name, datatype, chunk, size)
        )
        return Tensor(name, datatype, tuple(shape), data.reshape(shape), True), offset + binary_size
    if "data" not in raw:
        raise TensorError(f"input {name!r} has no 'data' and no binary_data_size")
    data = _json_data(name, datatype, raw["data"], len(shape))
    if data.size != size:
        raise TensorError(f"input {name!r}: shape {shape} holds {size} elements, but 'data' has {data.size}")
    return Tensor(name, datatype, tuple(shape), data.reshape(shape), False), offset


def _binary_numbers(name: str, datatype: str, chunk: bytes, size: int) -> np.ndarray:
    dtype = NUMERIC[datatype]
    if len(chunk) != size * dtype.itemsize:
        raise TensorError(
            f"input {name!r}: {size} {datatype} elements need {size * dtype.itemsize} bytes, not {len(chunk)}"
        )
    return np.frombuffer(chunk, dtype=dtype)


def _bytes_elements(name: str, chunk: bytes, size: int) -> np.ndarray:
    """BYTES elements: a 4-byte little-endian length, then that many bytes, each."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise TensorError(f"input {name!r}: a BYTES element's 4-byte length is cut off")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise TensorError(f"input {name!r}: a BYTES element of {length} bytes runs past its tensor's data")
        elements.append(chunk[offset : offset + length])
        offset += length
    if len(elements) != size:
        raise TensorError(f"input {name!r}: its shape holds {size} elements, but its binary data has {len(elements)}")
    return _object_array(elements)


def _json_data(name: str, datatype: str, data: Any, rank: int) -> np.ndarray:
    """``data`` as the protocol allows it: a flat (row-major) list, or nested as its shape."""
    if not isinstance(data, list):
        raise TensorError(f"input {name!r}: 'data' must be a list")
    depth, probe = 0, data
    while isinstance(probe, list) and probe:
        depth, probe = depth + 1, probe[0]
    if depth > max(rank, 1):
        raise TensorError(f"input {name!r}: 'data' is nested deeper than its {rank} dimensions")
    try:
        array = np.asarray(data, dtype=object if datatype == "BYTES" else None)
    except ValueError as exc:  # ragged nesting
        raise TensorError(f"input {name!r}: 'data' is not a regular nested list: {exc}") from exc
    if datatype == "BYTES":
        if not all(isinstance(e, str) for e in array.flat):
            raise TensorError(f"input {name!r}: BYTES 'data' must hold strings")
        return array.reshape(-1)
    dtype = NUMERIC[datatype]
    if array.size and array.dtype.kind not in JSON_KINDS[dtype.kind]:
        raise TensorError(f"input {name!r}: {datatype} 'data' must hold {_kind_words(dtype.kind)}")
    return array.astype(dtype).reshape(-1)


def _kind_words(kind: str) -> str:
    return {"b": "true/false", "f": "numbers"}.get(kind, "integers")


def _object_array(elements: list[Any]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array


def _requested_outputs(raw: Any, binary_default: bool) -> list[RequestedOutput]:
    if not isinstance(raw, list):
        raise TensorError("'outputs' must be a list")
    outputs = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise TensorError("every requested output must be an object with a 'name'")
        parameters = _parameters(item.get("parameters"), f"output {item['name']!r}")
        for key in parameters:
            if key not in ("binary_data", "classification"):
                raise TensorError(f"output {item['name']!r}: parameter {key!r} is not supported (shared memory is not)")
        if "classification" in parameters:
            raise TensorError(
                "the classification extension is not supported: ask for the outputs top_index, "
                "top_probability and top_label, with the request parameter top_k"
            )
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise TensorError(f"output {item['name']!r}: binary_data must be true or false")
        outputs.append(RequestedOutput(item["name"], binary))
    if len({o.name for o in outputs}) != len(outputs):
        raise TensorError("an output is requested twice")
    return outputs


def encode_response(
    model: str, body: InferBody, tensors: dict[str, tuple[str, np.ndarray]], specs: list[TensorSpec]
) -> Response:
    """The requested outputs (all, in the model's order, when none are named): JSON ``data``,
    or raw bytes after the JSON header for those asked in binary."""
    known = [spec.name for spec in specs]
    wanted = body.outputs or [RequestedOutput(name, body.binary_output) for name in known if name in tensors]
    header: dict[str, Any] = {"model_name": model, "model_version": VERSION}
    if body.id is not None:
        header["id"] = body.id
    outputs, chunks = [], []
    for output in wanted:
        datatype, array = tensors[output.name]
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": list(array.shape)}
        if output.binary:
            chunk = _bytes_payload(array) if datatype == "BYTES" else array.astype(NUMERIC[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = [e.decode() for e in array.flat] if datatype == "BYTES" else array.ravel().tolist()
        outputs.append(entry)
    header["outputs"] = outputs
    encoded = json.dumps(header, ensure_ascii=False, allow_nan=False).encode()
    if not chunks:
        return Response(encoded, media_type="application/json")
    headers = {HEADER_LENGTH: str(len(encoded))}
    return Response(b"".join([encoded, *chunks]), media_type="application/octet-stream", headers=headers)


def _bytes_payload(array: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in array.flat)


# -- what each task takes and gives ------------------------------------------------------------


def _param(body: InferBody, name: str, *kinds: type) -> Any:
    """A request parameter of one of ``kinds`` (JSON true is no integer here), or None."""
    value = body.parameters.get(name)
    if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        raise TensorError(f"parameter {name!r} must be {TYPE_WORDS[kinds]}, not {value!r}")
    return value


def _checked_inputs(body: InferBody, allowed: dict[str, TensorSpec]) -> list[Tensor]:
    """The inputs, each of its declared datatype and rank; unknown names refused."""
    for name in body.inputs:
        if name not in allowed:
            raise TensorError(f"unknown input {name!r}; this model takes {sorted(allowed)}")
    tensors = []
    for name, tensor in body.inputs.items():
        spec = allowed[name]
        if tensor.datatype != spec.datatype:
            raise TensorError(f"input {name!r} must be {spec.datatype}, not {tensor.datatype}")
        if len(tensor.shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
        ):
            raise TensorError(f"input {name!r} must have shape {list(spec.shape)} (-1: any), not {list(tensor.shape)}")
        tensors.append(tensor)
    return tensors


class V2Task:
    """How one task speaks the protocol: its tensors, its request, its outputs."""

    task: ClassVar[str]
    parameters: ClassVar[frozenset[str]]

    def inputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        raise NotImplementedError

    def outputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        raise NotImplementedError

    def request(self, body: InferBody, card: dict[str, Any], settings: Settings, wanted: set[str]) -> Any:
        raise NotImplementedError

    def tensors(self, output: Any) -> dict[str, tuple[str, np.ndarray]]:
        raise NotImplementedError

    def check_parameters(self, body: InferBody) -> None:
        for key in body.parameters:
            if key not in self.parameters and key not in IGNORED_PARAMETERS:
                raise TensorError(f"unknown request parameter {key!r}; this model takes {sorted(self.parameters)}")


class ClassifyV2(V2Task):
    """``image`` (BYTES [B], encoded files; base64 strings in JSON) or ``pixels`` (FP32
    [B, 3, H, W] in [0, 1]; cropped and resized like a decoded file); ``labels`` (BYTES [K])
    for zero-shot models. Outputs: every label's probability, each copy's weight and top
    label, and the top ``top_k``."""

    task = "classify"
    parameters = frozenset({"method", "top_k"})

    def inputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        specs = [TensorSpec("image", "BYTES", (-1,)), TensorSpec("pixels", "FP32", (-1, 3, -1, -1))]
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

    def request(self, body: InferBody, card: dict[str, Any], settings: Settings, wanted: set[str]) -> ClassifyRequest:
        self.check_parameters(body)
        tensors = {t.name: t for t in _checked_inputs(body, {s.name: s for s in self.inputs(card)})}
        if ("image" in tensors) == ("pixels" in tensors):
            raise TensorError("send exactly one of the inputs 'image' (BYTES [B]) and 'pixels' (FP32 [B, 3, H, W])")
        images: list[EncodedImage | Pixels]
        if "image" in tensors:
            image = tensors["image"]
            if image.binary:
                images = [EncodedImage(e) for e in image.data]
            else:  # JSON strings cannot carry raw bytes: the files are base64
                images = [EncodedImage(decode_base64(e, settings.max_body_bytes)) for e in image.data]
        else:
            images = [Pixels(p) for p in tensors["pixels"].data]
        labels = None
        if "labels" in tensors:
            labels = [_text(e, "labels") for e in tensors["labels"].data]
        return ClassifyRequest(
            images,
            _param(body, "method", str),
            _param(body, "top_k", int),
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


class GenerateV2(V2Task):
    """``text_input`` (BYTES [1]: one prompt) -> ``text_output`` (BYTES [1]), with the
    copies' weights and why it stopped."""

    task = "generate"
    parameters = frozenset({"method", "max_new_tokens", "temperature", "top_k", "seed", "relaxed"})

    def inputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        return [TensorSpec("text_input", "BYTES", (1,))]

    def outputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        return [
            TensorSpec("text_output", "BYTES", (1,)),
            TensorSpec("lambda", "FP32", (1, len(card["transforms"]))),
            TensorSpec("finish_reason", "BYTES", (1,)),
        ]

    def request(self, body: InferBody, card: dict[str, Any], settings: Settings, wanted: set[str]) -> GenerateRequest:
        self.check_parameters(body)
        tensors = _checked_inputs(body, {s.name: s for s in self.inputs(card)})
        if not tensors:
            raise TensorError("send the input 'text_input' (BYTES [1])")
        temperature = _param(body, "temperature", int, float)
        return GenerateRequest(
            _text(tensors[0].data[0], "text_input"),
            _param(body, "max_new_tokens", int),
            _param(body, "method", str),
            None if temperature is None else float(temperature),
            _param(body, "top_k", int),
            _param(body, "seed", int),
            _param(body, "relaxed", bool),
        )

    def tensors(self, output: GenerateOutput) -> dict[str, tuple[str, np.ndarray]]:
        result = output.result
        return {
            "text_output": ("BYTES", _object_array([result.text.encode()])),
            "lambda": ("FP32", np.array([result.weights], np.float32)),
            "finish_reason": ("BYTES", _object_array([result.finish_reason.encode()])),
        }


def _text(element: bytes | str, name: str) -> str:
    if isinstance(element, str):
        return element
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TensorError(f"input {name!r}: an element is not UTF-8 text") from exc


V2_TASKS: dict[str, V2Task] = {adapter.task: adapter for adapter in (ClassifyV2(), GenerateV2())}


# -- the routes --------------------------------------------------------------------------------


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class V2Route(APIRoute):
    """Errors of /v2 routes in the protocol's shape, ``{"error": message}``, not /v1's."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except EngineError as exc:
                headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))} if isinstance(exc, QueueFull) else None
                return v2_error(V2_STATUS.get(exc.code, 500), exc.message, headers)
            except ApiError as exc:
                return v2_error(exc.status, exc.message, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
            except BodyTooLarge as exc:
                return v2_error(413, str(exc), {"Connection": "close"})

        return route


def served(request: Request, name: str, version: str | None) -> tuple[Any, V2Task]:
    """The model ``name`` and how its task speaks v2; 404 for anything /v2 does not serve."""
    model = engine_of(request).model(name)
    adapter = V2_TASKS.get(model.task)
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
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"the binary tensor data extension: a JSON header of {HEADER_LENGTH} bytes, then "
                "each tensor's bytes",
            },
        },
    }
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


def build_v2_router() -> APIRouter:
    router = APIRouter(route_class=V2Route, tags=["open inference protocol (v2)"])

    @router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
    async def server_metadata(request: Request) -> dict[str, Any]:
        return {"name": "equiserve", "version": request.app.version, "extensions": ["binary_tensor_data"]}

    async def model_metadata(request: Request, name: str, version: str | None) -> dict[str, Any]:
        model, adapter = served(request, name, version)
        card = model.card()
        return {
            "name": name,
            "versions": [VERSION],
            "platform": f"equiserve_{model.task}",
            "inputs": [spec.metadata() for spec in adapter.inputs(card)],
            "outputs": [spec.metadata() for spec in adapter.outputs(card)],
        }

    async def model_ready(request: Request, name: str, version: str | None) -> dict[str, Any]:
        engine = engine_of(request)
        if engine.draining or not engine.ready:
            raise NotReady("the server is " + ("shutting down" if engine.draining else "loading its models"))
        served(request, name, version)
        return {"name": name, "ready": True}

    async def model_infer(request: Request, name: str, version: str | None) -> Response:
        engine, settings = engine_of(request), settings_of(request)
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
            return adapter.request(body, card, settings, wanted)

        output = await until_disconnected(
            request,
            lambda read: engine.infer(name, adapter.task, read, request_id=request.state.request_id),
            read_body,
        )
        return encode_response(name, parsed[0], adapter.tensors(output), specs)

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

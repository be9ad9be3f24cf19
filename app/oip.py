"""The Open Inference Protocol's tensors (KServe v2, Triton's HTTP/REST API), without HTTP.

An inference request is a JSON header and, with the binary tensor data extension, the raw bytes
of its tensors after it (``Inference-Header-Content-Length`` bytes of JSON, then each tensor's
bytes in order; ``BYTES`` elements as a 4-byte little-endian length and the bytes). This module
parses one into numpy arrays, encodes an answer's tensors, and holds ``V2Mapping``, the contract a
task fills in to speak the protocol (``app.tasks.<task>.http``); the routes are ``app.api.v2``'s.
No torch here.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from app.errors import InvalidTensor

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 8  # dimensions of an input tensor (the models take at most 4)
VERSION = "1"  # a model folder holds one version
# Triton's reserved request parameters that mean nothing here: accepted and ignored (the
# server's deadline, EQUISERVE_REQUEST_TIMEOUT_S, applies; there is no priority queue).
IGNORED_PARAMETERS = frozenset({"binary_data_output", "priority", "timeout"})

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


TensorError = InvalidTensor


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
    if b"\\u" in header and not _unicode(request):  # only an escape can make a lone surrogate
        raise TensorError("the inference request holds text that is not valid Unicode (a lone UTF-16 surrogate)")
    return infer_body(request, rest)


def infer_body(request: dict[str, Any], rest: bytes) -> InferBody:
    """A request's header as parsed JSON (``inputs``, ``outputs``, ``parameters``, ``id``) and the
    binary tensor data after it: what both the REST body and a gRPC request (``app.api.grpc``,
    whose raw contents become ``rest``) are read into."""
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


def _unicode(node: Any) -> bool:
    """Whether every string in a parsed JSON value is valid Unicode: ``json`` accepts a lone
    surrogate escape (``"\\ud800"``), which no UTF-8 text, log line or tokenizer can hold."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


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
    return object_array(elements)


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


def object_array(elements: list[Any]) -> np.ndarray:
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
) -> tuple[bytes, dict[str, str]]:
    """The requested outputs (all, in the model's order, when none are named): JSON ``data``,
    or raw bytes after the JSON header for those asked in binary; the body and its headers."""
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
            chunk = tensor_bytes(datatype, array)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = [e.decode() for e in array.flat] if datatype == "BYTES" else array.ravel().tolist()
        outputs.append(entry)
    header["outputs"] = outputs
    encoded = json.dumps(header, ensure_ascii=False, allow_nan=False).encode()
    if not chunks:
        return encoded, {"content-type": "application/json"}
    headers = {HEADER_LENGTH: str(len(encoded)), "content-type": "application/octet-stream"}
    return b"".join([encoded, *chunks]), headers


def tensor_bytes(datatype: str, array: np.ndarray) -> bytes:
    """An output's raw bytes, as binary tensor data (and gRPC's ``raw_output_contents``) carry them."""
    return bytes_payload(list(array.flat)) if datatype == "BYTES" else array.astype(NUMERIC[datatype]).tobytes()


def bytes_payload(elements: list[bytes]) -> bytes:
    """BYTES elements as the protocol's raw form: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# -- what each task takes and gives ------------------------------------------------------------


def parameter(body: InferBody, name: str, *kinds: type) -> Any:
    """A request parameter of one of ``kinds`` (JSON true is no integer here), or None."""
    value = body.parameters.get(name)
    if int in kinds and isinstance(value, float) and value.is_integer():  # JSON Schema's integer: 1.0 too
        value = int(value)
    if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        raise TensorError(f"parameter {name!r} must be {TYPE_WORDS[kinds]}, not {value!r}")
    return value


def checked_inputs(body: InferBody, allowed: dict[str, TensorSpec]) -> list[Tensor]:
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


# -- what a task maps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSchema:
    """An input tensor's JSON Schema pieces: one per dimension of its shape, one for its elements."""

    dimensions: list[dict[str, Any]]
    element: dict[str, Any]


def dimension_schema(size: int) -> dict[str, Any]:
    """A declared dimension: ``-1`` any size, else exactly ``size``."""
    return {"type": "integer", "minimum": 0} if size == -1 else {"const": size}


def element_schema(datatype: str) -> dict[str, Any]:
    """A JSON ``data`` element of ``datatype`` (``_json_data`` takes integers for floats, not booleans)."""
    if datatype == "BYTES":
        return {"type": "string"}
    kind = NUMERIC[datatype].kind
    return {"type": {"b": "boolean", "f": "number"}.get(kind, "integer")}


class V2Mapping:
    """How one task speaks the protocol: its tensors, its request, its outputs. ``card`` is the
    model's ``GET /v1/models`` entry, ``limits`` its task limits, ``wanted`` the outputs asked for."""

    parameters: ClassVar[frozenset[str]]

    def inputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        raise NotImplementedError

    def outputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        raise NotImplementedError

    def request(self, body: InferBody, card: dict[str, Any], limits: Any, wanted: set[str]) -> Any:
        raise NotImplementedError

    def tensors(self, output: Any) -> dict[str, tuple[str, np.ndarray]]:
        raise NotImplementedError

    def required_inputs(self, card: dict[str, Any]) -> list[tuple[str, ...]]:
        """Groups of inputs of which a request must send exactly one each (default: every input)."""
        return [(spec.name,) for spec in self.inputs(card)]

    def input_schema(self, spec: TensorSpec, card: dict[str, Any], limits: Any) -> TensorSchema:
        """What a model takes in input ``spec`` as JSON Schema: each dimension, each element (by
        default: as its declared shape and datatype say)."""
        return TensorSchema([dimension_schema(d) for d in spec.shape], element_schema(spec.datatype))

    def check_parameters(self, body: InferBody) -> None:
        for key in body.parameters:
            if key not in self.parameters and key not in IGNORED_PARAMETERS:
                raise TensorError(f"unknown request parameter {key!r}; this model takes {sorted(self.parameters)}")


def text_element(element: bytes | str, name: str) -> str:
    if isinstance(element, str):
        return element
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TensorError(f"input {name!r}: an element is not UTF-8 text") from exc

"""``TaskHttp``: how a task speaks HTTP. The edge (``app.api``) mounts every registered task's
adapter at ``POST /v1/models/{name}/{task}`` (and its ``V2Mapping`` under ``/v2``) and does the
rest once for all of them: the API key (before any byte of the body is read), admission,
deadlines, disconnects, error statuses and metrics.

An adapter turns a body into its task's request (``read``; by default a JSON body validated by
``body_type``, which is the request type itself unless ``to_request`` says otherwise) and an
answer into JSON (``encode``: the answer dataclass, serialised generically by its own type,
which is also its OpenAPI schema). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request

from app.errors import InvalidInput
from app.oip import V2Mapping

RequestT = TypeVar("RequestT")
OutputT = TypeVar("OutputT")


@dataclass(frozen=True)
class Served:
    """What an adapter may know of the model it reads a body for."""

    card: dict[str, Any]  # its GET /v1/models entry
    limits: Any  # its task's TaskLimits, with the entry's overrides
    max_body_bytes: int  # the server's body limit (EQUISERVE_MAX_BODY_BYTES)


def validation_message(errors: list) -> str:
    """The first few pydantic errors as one line: ``field: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in list(errors)[:5])


def parse_json(body_type: type, raw: bytes) -> Any:
    """``raw`` validated by ``body_type`` (a dataclass or pydantic model); ``InvalidInput`` (422)
    for JSON that does not parse (saying where) and for fields that do not fit."""
    try:
        return _adapter(body_type).validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        broken = [e for e in errors if e["type"] == "json_invalid"]
        if broken:
            where = broken[0]["msg"].removeprefix("Invalid JSON: ")
            raise InvalidInput(f"the body is not valid JSON: {where}") from exc
        raise InvalidInput(validation_message([{**e, "loc": ("body", *e["loc"])} for e in errors])) from exc


@cache
def _adapter(answer_type: type) -> TypeAdapter:
    return TypeAdapter(answer_type)


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


def body_schema(body_type: type) -> dict[str, Any]:
    """The JSON schema ``parse_json`` validates against."""
    return _adapter(body_type).json_schema(mode="validation")


def to_json(answer: Any) -> bytes:
    """Any answer dataclass as JSON, by its own type (aliases applied; NaN and infinity as null)."""
    return _adapter(type(answer)).dump_json(answer, by_alias=True)


def answer_schema(answer_type: type) -> dict[str, Any]:
    """The JSON schema of what ``to_json`` writes for ``answer_type``."""
    return _adapter(answer_type).json_schema(mode="serialization", by_alias=True)


class TaskHttp(Generic[RequestT, OutputT]):
    """A task's HTTP adapter; subclasses set the class attributes and override what differs."""

    task: ClassVar[str]
    summary: ClassVar[str]  # the route's one-line OpenAPI summary
    answer_type: ClassVar[type]  # the answer dataclass: serialised by to_json, documented by answer_schema
    body_type: ClassVar[type | None] = None  # a JSON body's dataclass; None: override read and openapi_body
    errors: ClassVar[dict[int, str]] = {}  # this route's own words for the common error statuses
    v2: ClassVar[V2Mapping | None] = None  # its Open Inference Protocol mapping, if it has one
    streams: ClassVar[bool] = False  # a request may ask for server-sent events (wants_stream)

    async def read(self, request: Request, served: Served) -> RequestT:
        """The body -> the task's request. Called once the engine admitted the request."""
        assert self.body_type is not None, f"{type(self).__name__} reads no JSON: override read"
        return self.to_request(parse_json(self.body_type, await request.body()), served)

    def to_request(self, body: Any, served: Served) -> RequestT:
        return body

    def wants_stream(self, request: RequestT) -> bool:
        """Whether to answer with server-sent events: an event per event the model emits (its
        dataclass as JSON), then ``done`` with the answer, or ``error``."""
        return False

    def encode(self, output: OutputT) -> bytes:
        return to_json(output)

    def openapi_body(self) -> dict[str, Any]:
        """The route's ``requestBody`` in OpenAPI (default: ``body_type``'s schema, with its examples)."""
        assert self.body_type is not None, f"{type(self).__name__} reads no JSON: override openapi_body"
        schema = inline_definitions(body_schema(self.body_type))
        content: dict[str, Any] = {"schema": schema}
        if "examples" in schema:
            content["examples"] = {f"example {i + 1}": {"value": v} for i, v in enumerate(schema["examples"])}
        return {"required": True, "content": {"application/json": content}}

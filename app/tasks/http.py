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
    queue_size: int | None = None  # items its queue holds (EQUISERVE_QUEUE_SIZE): a request of more is a 413

    def max_items(self, limit: int) -> int:
        """The most batch items one request may hold: its task's ``limit``, and no more than the queue."""
        return limit if self.queue_size is None else min(limit, self.queue_size)

    def method(self, preferred: str) -> str:
        """``preferred`` where the model serves it, else its default method (for examples)."""
        return preferred if preferred in self.card["methods"] else self.card["default_method"]


def validation_message(errors: list) -> str:
    """The first few pydantic errors as one line: ``field: message; ...``. The same error at many
    positions of a list (a flat list where a list of lists belongs) is one entry that names the
    positions: ``body.observations.*: Input should be a valid array (at [0], [1], [2], [3])``."""
    groups: dict[tuple[tuple[Any, ...], str], list[tuple[Any, ...]]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        shape = tuple("*" if isinstance(part, int) else part for part in loc)
        groups.setdefault((shape, error["msg"]), []).append(loc)
    parts = []
    for (shape, message), locs in list(groups.items())[:5]:
        if len(locs) == 1:
            parts.append(f"{_dotted(locs[0])}: {message}")
            continue
        at = ["".join(f"[{part}]" for part in loc if isinstance(part, int)) for loc in locs]
        shown = ", ".join(at[:8]) + (f", ... ({len(at)} in all)" if len(at) > 8 else "")
        parts.append(f"{_dotted(shape)}: {message} (at {shown})")
    return "; ".join(parts)


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(map(str, loc)) or "body"


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


# What Python's ``\s`` (and ``str.split``, ``str.strip``) takes for whitespace, spelt out: ECMA-262's
# ``\s``, which JSON Schema's ``pattern`` means, differs (no U+001C-U+001F or U+0085, but U+FEFF).
WHITESPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def portable_pattern(pattern: str) -> str:
    r"""A Python regex whose ``\s`` / ``\S`` mean what they do in Python in every dialect: spelt as
    classes of ``WHITESPACE``. (Not inside a class of the pattern's own, which it refuses.)"""
    out: list[str] = []
    in_class, i = False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            if escaped in "sS":
                if in_class:
                    raise ValueError(f"\\{escaped} inside a character class: {pattern!r}")
                out.append(f"[{WHITESPACE}]" if escaped == "s" else f"[^{WHITESPACE}]")
            else:
                out.append(char + escaped)
            i += 2
            continue
        if char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


def narrowed(schema: dict[str, Any], **keywords: Any) -> dict[str, Any]:
    """``schema`` with ``keywords`` added: to each branch that is not ``null`` where it is optional
    (pydantic writes ``X | None`` as ``anyOf``), else to itself."""
    if "anyOf" in schema:
        branches = [b if b.get("type") == "null" else {**b, **keywords} for b in schema["anyOf"]]
        return {**schema, "anyOf": branches}
    return {**schema, **keywords}


def constrained(schema: dict[str, Any], **properties: dict[str, Any]) -> dict[str, Any]:
    """An object ``schema`` whose named properties get the keywords given for each (``narrowed``)."""
    fields = dict(schema["properties"])
    for name, keywords in properties.items():
        fields[name] = narrowed(fields[name], **keywords)
    return {**schema, "properties": fields}


def method_keywords(served: Served) -> dict[str, Any]:
    """A request's ``method``: one the model serves (any other is a 422)."""
    return {"enum": list(served.card["methods"])}


def with_examples(content: dict[str, Any], examples: list[Any]) -> dict[str, Any]:
    """A media type's ``content`` with its ``examples``, in its schema and by name beside it."""
    if not examples:
        return content
    schema = {**content["schema"], "examples": examples}
    return {**content, "schema": schema, "examples": {f"example {i + 1}": {"value": v} for i, v in enumerate(examples)}}


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
    # the events a stream sends before ``done`` or ``error``, by name: their dataclass (the data, as JSON)
    stream_events: ClassVar[dict[str, type]] = {}

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

    def openapi_body(self, served: Served | None = None) -> dict[str, Any]:
        """The route's ``requestBody`` in OpenAPI: ``body_type``'s schema with its examples; for
        ``served`` (one model), narrowed to what that model accepts (``constrain``), with
        examples it answers (``examples``). Without one (while loading), any model's."""
        assert self.body_type is not None, f"{type(self).__name__} reads no JSON: override openapi_body"
        schema = inline_definitions(body_schema(self.body_type))
        examples = schema.pop("examples", [])
        if served is not None:
            schema, examples = self.constrain(schema, served), self.examples(served)
        return {"required": True, "content": {"application/json": with_examples({"schema": schema}, examples)}}

    def constrain(self, schema: dict[str, Any], served: Served) -> dict[str, Any]:
        """``body_type``'s schema narrowed to the limits and facts of one model: the checks its
        ``read`` and the model's ``split`` make, as JSON Schema keywords."""
        return schema

    def examples(self, served: Served) -> list[Any]:
        """Bodies that model answers, for the document."""
        return []

"""``GET /openapi.json`` as the served models have it.

The routes are generic (``POST /v1/models/{name}/{task}``, ``/v2/models/{name}/infer``), but what a
request may hold is not: the limits (``EQUISERVE_<TASK>_*`` and each entry's ``limits:``) and the
model itself (its methods, labels, observation length, vocabulary) decide. So once the engine is
ready the document lists one concrete path per served model, with that model's own request
schema, the checks its adapter and ``split`` make written as JSON Schema keywords (the adapter's
``openapi_body``). The templated paths go: every name but the served ones is a 404, which a
client (or a fuzzer) reading the document should never have to try. The ``GET /v2/models/{name}``
routes keep their template, with ``name`` one of the models /v2 serves. While loading, the
document is the generic one. No torch here.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI

from app.config import Settings
from app.engine.engine import Engine
from app.tasks import TASKS, task_http
from app.tasks.base import ServedModel

from .inference import served_model, task_path
from .v2 import MODEL_PATH, infer_request_body

Document = dict[str, Any]


def install_openapi(app: FastAPI, engine: Engine, settings: Settings) -> None:
    """``app.openapi`` (what ``/openapi.json``, ``/docs`` and ``/redoc`` read) becomes the served
    document: built once the models are loaded, and again only if the set of models changes."""
    fastapi_document: Callable[[], Document] = app.openapi  # from the routes (cached by FastAPI)

    def generic() -> Document:
        with warnings.catch_warnings():  # the repeated ids it warns of are made unique below
            warnings.filterwarnings("ignore", message="Duplicate Operation ID", category=UserWarning)
            return fastapi_document()

    built: dict[tuple[tuple[str, str, int], ...], Document] = {}

    def document() -> Document:
        if not engine.ready:
            return unique_operation_ids(generic())
        key = tuple((name, model.task, id(model)) for name, model in engine.models.items())
        if key not in built:
            built.clear()
            built[key] = unique_operation_ids(served_document(generic(), engine.models, settings))
        return built[key]

    app.openapi = document  # type: ignore[method-assign]


def unique_operation_ids(document: Document) -> Document:
    """FastAPI gives every method of one route the route's operationId (the health routes take GET
    and HEAD), which OpenAPI forbids: a repeated id gets its method appended. In place; returned."""
    seen: set[str] = set()
    for item in document.get("paths", {}).values():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "operationId" not in operation:
                continue
            if operation["operationId"] in seen:
                operation["operationId"] = f"{operation['operationId']}_{method}"
            seen.add(operation["operationId"])
    return document


def served_document(generic: Document, models: dict[str, ServedModel], settings: Settings) -> Document:
    """``generic`` with the templated inference paths replaced by one path per served model."""
    document = copy.deepcopy(generic)
    v2_models = {name: model for name, model in models.items() if task_http(model.task).v2 is not None}
    paths: dict[str, Any] = {}
    for path, item in document["paths"].items():
        task = next((t for t in TASKS if path == task_path(t)), None)
        if task is not None:
            for name, model in models.items():
                if model.task == task:
                    paths[f"/v1/models/{quote(name, safe='')}/{task}"] = v1_item(item, name, model, settings)
        elif path == MODEL_PATH + "/infer":
            for name, model in v2_models.items():
                paths[f"/v2/models/{quote(name, safe='')}/infer"] = v2_item(item, name, model, settings)
        elif path in (MODEL_PATH, MODEL_PATH + "/ready"):
            if v2_models:
                paths[path] = named(item, list(v2_models))
        else:
            paths[path] = item
    document["paths"] = paths
    return document


def concrete(operation: dict[str, Any], operation_id: str) -> dict[str, Any]:
    """``operation`` without its ``name`` path parameter (the path names the model)."""
    operation = copy.deepcopy(operation)
    parameters = [p for p in operation.get("parameters", []) if not (p["in"] == "path" and p["name"] == "name")]
    if parameters:
        operation["parameters"] = parameters
    else:
        operation.pop("parameters", None)
    operation["operationId"] = operation_id
    return operation


def v1_item(item: dict[str, Any], name: str, model: ServedModel, settings: Settings) -> dict[str, Any]:
    operation = concrete(item["post"], f"{model.task}__{name}")
    served = served_model(model, settings.max_body_bytes, settings.queue_size)
    operation["requestBody"] = task_http(model.task).openapi_body(served)
    operation["description"] = model_description(name, model)
    return {"post": operation}


def v2_item(item: dict[str, Any], name: str, model: ServedModel, settings: Settings) -> dict[str, Any]:
    http = task_http(model.task)
    assert http.v2 is not None
    operation = concrete(item["post"], f"infer__{name}")
    # the /v2 parameters are the /v1 fields of the same name, with their limits
    served = served_model(model, settings.max_body_bytes, settings.queue_size)
    fields = http.openapi_body(served)["content"]["application/json"]["schema"]["properties"]
    operation["requestBody"] = infer_request_body(http.v2, model.card(), model.limits, fields)
    operation["description"] = model_description(name, model)
    operation["responses"].pop("422", None)  # FastAPI's own, for a path parameter: /v2 answers 400
    return {"post": operation}


def named(item: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A ``/v2/models/{name}...`` path item whose ``name`` is one of ``names``."""
    item = copy.deepcopy(item)
    for operation in item.values():
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path" and parameter["name"] == "name":
                parameter["schema"] = {**parameter["schema"], "enum": names}
    return item


def model_description(name: str, model: ServedModel) -> str:
    card = model.card()
    about = f": {card['description']}" if card["description"] else ""
    return f"Model `{name}`{about} (group {card['group']}; methods {', '.join(card['methods'])})."

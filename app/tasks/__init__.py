"""The tasks the engine serves, one package each, and the one table that names them.

A task is a package ``app.tasks.<task>`` whose ``__init__`` (import-light: no torch) declares its
parts in ``PARTS`` (``TaskParts``): the ``ServedModel`` subclass, the HTTP adapter, the limits,
the command-line module and the docs page. Everything else (the engine, the HTTP edge, the CLI,
the web page's model list) finds a task through this table; nothing outside the package names
one. Its parts are imported only when used, so serving images never imports a language model.
Adding a task: a package with ``PARTS``, one line in ``TASKS``, a ``model.yaml``, a docs page
(docs/architecture.md, "Adding a task").

Below the table: reading an entry of the model repository with its task's spec, and loading it
with its task's loader.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from app.errors import ModelLoadError
from app.repository import model_dir

if TYPE_CHECKING:
    from .base import LoadOptions, ServedModel, TaskLimits, TaskSpec
    from .http import TaskHttp

# task name -> its package
TASKS: dict[str, str] = {
    "classify": "app.tasks.classify",
    "embed": "app.tasks.embed",
    "generate": "app.tasks.generate",
    "translate": "app.tasks.translate",
    "act": "app.tasks.act",
}


@dataclass(frozen=True)
class TaskParts:
    """Where a task's parts are: ``"module:attribute"`` relative to its package (``.model:ActModel``)."""

    model: str  # its ServedModel subclass
    http: str  # its TaskHttp adapter (no torch)
    limits: str  # its TaskLimits subclass (no torch)
    cli: str | None = None  # a module with add_parsers(commands): its train / evaluate commands
    docs: str | None = None  # its page under docs/


def _resolve(package: str, reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    loaded = importlib.import_module(module, package)
    return getattr(loaded, attribute) if attribute else loaded


def _check(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return TASKS[task]


def task_parts(task: str) -> TaskParts:
    return importlib.import_module(_check(task)).PARTS


def task_class(task: str) -> type[ServedModel]:
    """The ``ServedModel`` subclass of ``task``; ``ValueError`` naming the known ones otherwise."""
    return _resolve(_check(task), task_parts(task).model)


def task_http(task: str) -> TaskHttp:
    return _resolve(_check(task), task_parts(task).http)


def task_limits(task: str) -> type[TaskLimits]:
    return _resolve(_check(task), task_parts(task).limits)


def task_cli(task: str) -> ModuleType | None:
    reference = task_parts(task).cli
    return None if reference is None else _resolve(_check(task), reference)


# -- the model repository's entries --------------------------------------------------------------


def read_spec(folder: Path) -> TaskSpec:
    """Validate ``folder/model.yaml`` with its task's spec class."""
    path = folder / "model.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path} is missing") from exc
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} is invalid: expected a mapping")
    task = raw.get("task", "classify")
    try:
        spec_type = task_class(str(task)).spec_type
        return spec_type.model_validate({"task": task, **raw, "name": folder.name})
    except (ValidationError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path} is invalid: {exc}") from exc


def weights_are_local(models_dir: Path, name: str) -> bool:
    """Whether entry ``name`` loads without a download."""
    spec = read_spec(model_dir(models_dir, name))
    return task_class(spec.task).weights_are_local(spec)


def load_model(
    models_dir: Path,
    name: str,
    device: str = "auto",
    dtype: str = "float32",
    channels_last: bool = True,
    *,
    runtime: str = "torch",
    onnx_cache_dir: Path | None = None,
    threads: int | None = None,
    options: LoadOptions | None = None,
) -> ServedModel:
    """Load entry ``name`` with its task's loader (``options`` wins over the keywords)."""
    from .base import LoadOptions

    folder = model_dir(models_dir, name)
    spec = read_spec(folder)
    options = options or LoadOptions(device, dtype, channels_last, runtime, onnx_cache_dir, threads)
    return task_class(spec.task).load(folder, spec, options)

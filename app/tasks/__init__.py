"""The tasks the engine serves, one package each; imported only when a model of theirs is.

Adding a task: a package ``app.tasks.<task>`` with a ``ServedModel`` subclass (see
``app.tasks.base`` and docs/architecture.md), one line here, and a ``model.yaml``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import ServedModel

# task name -> "module:class" of its ServedModel; lazy, so serving images never imports a language model.
TASKS: dict[str, str] = {
    "classify": "app.tasks.classify.model:ClassifyModel",
    "generate": "app.tasks.generate.model:GenerateModel",
    "act": "app.tasks.act.task:ActModel",
    "translate": "app.tasks.translate.model:TranslateModel",
}


def task_class(task: str) -> type[ServedModel]:
    """The ``ServedModel`` subclass of ``task``; ``ValueError`` naming the known ones otherwise."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    module, _, name = TASKS[task].partition(":")
    return getattr(importlib.import_module(module), name)

"""``RunnerModel``: the ``ServedModel`` of a task whose model side is a runner on plain data.

The act and translate tasks keep their model side in a runner (``ActRunner``, ``TranslateRunner``)
that knows nothing of the engine: ``prepare(request, ...)`` checks a request into items,
``__call__(items)`` runs one fused batch, ``respond`` builds the answer, ``warmup`` and
``card_extras`` serve the engine. Their items are small (a state, a command), so checking them on
the event loop is cheap and the preprocessing pool has nothing to do. A task subclasses this,
names its runner, and says in ``split`` which of the server's limits its runner applies.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from app.engine.registry import resolve_device
from app.tasks.base import LoadOptions, ServedModel, TaskSpec, Timing

if TYPE_CHECKING:
    import torch

    from app.config import Settings

RequestT = TypeVar("RequestT")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
OutputT = TypeVar("OutputT")


class Runner(Protocol):
    """What ``RunnerModel`` needs of a runner (``prepare`` takes task-specific limits)."""

    spec: Any
    model: torch.nn.Module
    device: torch.device
    lambda_trained: bool

    @classmethod
    def load(cls, folder: Path, spec: Any, device: torch.device) -> Runner: ...

    @property
    def backbone_name(self) -> str: ...

    @property
    def transforms(self) -> list[str]: ...

    def card_extras(self) -> dict[str, Any]: ...

    def __call__(self, items: list[Any]) -> Sequence[Any]: ...

    def respond(self, request: Any, results: list[Any], timing: Timing) -> Any: ...

    def warmup(self, batch_size: int) -> None: ...


class RunnerModel(ServedModel[RequestT, ItemT, ItemT, ResultT, OutputT], Generic[RequestT, ItemT, ResultT, OutputT]):
    runner_type: ClassVar[type[Runner]]

    def __init__(self, spec: TaskSpec, runner: Any) -> None:
        super().__init__(
            spec,
            lambda_trained=runner.lambda_trained,
            device=runner.device,
            dtype=next(runner.model.parameters()).dtype,
        )
        self.runner = runner

    @classmethod
    def load(cls, folder: Path, spec: Any, options: LoadOptions) -> RunnerModel:
        return cls(spec, cls.runner_type.load(folder, spec, resolve_device(options.device)))

    @property
    def backbone_name(self) -> str:
        return self.runner.backbone_name

    @property
    def transforms(self) -> list[str]:
        return self.runner.transforms

    def card_extras(self) -> dict[str, Any]:
        return self.runner.card_extras()

    @abstractmethod
    def split(self, request: RequestT, settings: Settings) -> Sequence[ItemT]:
        """``self.runner.prepare(request, <this task's limits from settings>)``."""

    def prepare(self, piece: ItemT) -> ItemT:
        return piece

    def __call__(self, items: list[ItemT]) -> Sequence[ResultT | BaseException]:
        return self.runner(items)

    def respond(self, request: RequestT, results: list[ResultT], timing: Timing) -> OutputT:
        return self.runner.respond(request, results, timing)

    def warmup(self, batch_size: int) -> None:
        self.runner.warmup(batch_size)

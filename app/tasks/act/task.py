"""Task ``act`` as the engine sees it: ``ActModel`` plugs ``ActRunner`` into ``ServedModel``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.engine.registry import resolve_device
from app.tasks.base import LoadOptions, ServedModel, Timing

from .messages import ActOutput, ActRequest, ActResult
from .runner import ActItem, ActRunner
from .spec import ActSpec

if TYPE_CHECKING:
    from app.config import Settings


class ActModel(ServedModel[ActRequest, ActItem, ActItem, ActResult, ActOutput]):
    """A DQN agent served over its environment's symmetry group (tiny: float32, the CPU is plenty)."""

    task = "act"
    spec_type = ActSpec
    spec: ActSpec

    def __init__(self, spec: ActSpec, runner: ActRunner) -> None:
        super().__init__(
            spec,
            lambda_trained=runner.lambda_trained,
            device=runner.device,
            dtype=next(runner.model.parameters()).dtype,
        )
        self.runner = runner

    @classmethod
    def load(cls, folder: Path, spec: ActSpec, options: LoadOptions) -> ActModel:
        return cls(spec, ActRunner.load(folder, spec, resolve_device(options.device)))

    @property
    def backbone_name(self) -> str:
        return self.runner.backbone_name

    @property
    def transforms(self) -> list[str]:
        return self.runner.transforms

    def card_extras(self) -> dict[str, Any]:
        return self.runner.card_extras()

    def split(self, request: ActRequest, settings: Settings) -> Sequence[ActItem]:
        # Observations are a few numbers each: checking them is cheap enough for the event loop.
        return self.runner.prepare(request, settings.max_observations)

    def prepare(self, piece: ActItem) -> ActItem:
        return piece

    def __call__(self, items: list[ActItem]) -> Sequence[ActResult | BaseException]:
        return self.runner(items)

    def respond(self, request: ActRequest, results: list[ActResult], timing: Timing) -> ActOutput:
        return self.runner.respond(request, results, timing)

    def warmup(self, batch_size: int) -> None:
        self.runner.warmup(batch_size)

"""Task ``act`` as the engine sees it: ``ActModel`` plugs ``ActRunner`` into the engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from app.tasks.runner_model import RunnerModel

from .messages import ActOutput, ActRequest, ActResult
from .runner import ActItem, ActRunner
from .spec import ActSpec

if TYPE_CHECKING:
    from app.config import Settings


class ActModel(RunnerModel[ActRequest, ActItem, ActResult, ActOutput]):
    """A DQN agent served over its environment's symmetry group (tiny: float32, the CPU is plenty)."""

    task = "act"
    spec_type = ActSpec
    spec: ActSpec
    runner_type = ActRunner
    runner: ActRunner

    def split(self, request: ActRequest, settings: Settings) -> Sequence[ActItem]:
        return self.runner.prepare(request, settings.max_observations)

"""Task ``translate`` as the engine sees it: ``TranslateModel`` plugs ``TranslateRunner`` into the engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from app.tasks.runner_model import RunnerModel

from .messages import TranslateOutput, TranslateRequest, TranslationResult
from .runner import TranslateItem, TranslateRunner
from .spec import TranslateSpec

if TYPE_CHECKING:
    from app.config import Settings


class TranslateModel(RunnerModel[TranslateRequest, TranslateItem, TranslationResult, TranslateOutput]):
    """A SCAN seq2seq served over its word-swap group (tiny: float32, the CPU is plenty)."""

    task = "translate"
    spec_type = TranslateSpec
    spec: TranslateSpec
    runner_type = TranslateRunner
    runner: TranslateRunner
    # A batch decodes up to max_actions steps: let a command arriving just after a lone one join it.
    always_wait = True

    def split(self, request: TranslateRequest, settings: Settings) -> Sequence[TranslateItem]:
        return self.runner.prepare(request, settings.max_commands, settings.max_command_words)

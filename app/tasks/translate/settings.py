"""The limits of translate requests: ``EQUISERVE_TRANSLATE_*`` env vars, or ``limits:`` in a model's ``model.yaml``."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from app.tasks.base import TaskLimits, limit


class TranslateLimits(TaskLimits):
    model_config = SettingsConfigDict(title="translate")

    max_commands: int = limit("translate", "max_commands", 64, "commands per request (413)", ge=1)
    max_command_words: int = limit(
        "translate", "max_command_words", 9, "words per command (422); SCAN's longest has 9", ge=1
    )

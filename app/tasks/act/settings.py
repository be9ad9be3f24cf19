"""The limits of act requests: ``EQUISERVE_ACT_*`` env vars, or ``limits:`` in a model's ``model.yaml``."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from app.tasks.base import TaskLimits, limit


class ActLimits(TaskLimits):
    model_config = SettingsConfigDict(title="act")

    max_observations: int = limit("act", "max_observations", 256, "environment states per request (422)", ge=1)

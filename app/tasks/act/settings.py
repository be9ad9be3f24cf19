"""The limits of act requests: ``EQUISERVE_ACT_*`` env vars, or ``limits:`` in a model's ``model.yaml``."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from app.tasks.base import TaskLimits, limit


class ActLimits(TaskLimits):
    model_config = SettingsConfigDict(title="act")

    max_observations: int = limit("act", "max_observations", 256, "environment states per request (422)", ge=1)
    # A bound the request can state: far outside it a state overflows the Q-network (whose answer
    # would be inf), at a magnitude that depends on its weights; no environment here comes near it.
    max_abs_value: float = limit(
        "act", "max_abs_value", 1e6, "largest magnitude of a number in an observation (422)", gt=0
    )

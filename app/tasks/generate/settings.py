"""The limits and defaults of generate requests: ``EQUISERVE_GENERATE_*`` env vars, or ``limits:``
in a model's ``model.yaml``."""

from __future__ import annotations

from pydantic import model_validator
from pydantic_settings import SettingsConfigDict

from app.tasks.base import TaskLimits, limit


class GenerateLimits(TaskLimits):
    model_config = SettingsConfigDict(title="generate")

    max_prompt_chars: int = limit(
        "generate", "max_prompt_chars", 8192, "prompt characters (413 before tokenizing)", ge=1
    )
    max_prompt_tokens: int = limit("generate", "max_prompt_tokens", 512, "prompt tokens (413)", ge=1)
    max_new_tokens: int = limit("generate", "max_new_tokens", 256, "tokens one request may ask for (413)", ge=1)
    default_max_new_tokens: int = limit(
        "generate", "default_max_new_tokens", 32, "tokens generated when a request does not say", ge=1
    )
    default_temperature: float = limit("generate", "default_temperature", 1.0, "0 = greedy", ge=0, le=100)
    default_top_k: int = limit("generate", "default_top_k", 50, "0 = the whole vocabulary", ge=0)
    max_batch_size: int | None = limit(
        "generate", "max_batch_size", None, "requests decoded together (default EQUISERVE_MAX_BATCH_SIZE)", ge=1
    )

    @model_validator(mode="after")
    def _check(self) -> GenerateLimits:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens is over max_new_tokens")
        return self

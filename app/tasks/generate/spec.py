"""The ``model.yaml`` of a language model (``task: generate``): its text group and limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.equivariance.text import FORMS, CombineSpace, TextGroupError, parse_axes
from app.tasks.base import TaskSpec

Form = Literal["space", "bare", "capitalized_space", "capitalized_bare"]


class TextGroupSpec(BaseModel):
    """How the text group is built (``group: gender+race+orientation`` names its axes)."""

    model_config = ConfigDict(extra="forbid")

    sets: dict[str, list[list[str]]] = Field(
        default_factory=dict, description="extra or replacement equality word sets by axis name"
    )
    forms: list[Form] = Field(default_factory=lambda: list(FORMS), description="word forms that are swapped")
    on_multi_token: Literal["error", "skip"] = Field(
        "error", description="a form split into several tokens: stop loading, or leave that form unswapped"
    )
    general_words: list[str] | None = Field(None, description="R-EquiLM's general words (default: pronouns etc.)")
    relaxed: bool = Field(False, description="serve R-EquiLM by default (requests may override)")
    combine: CombineSpace = Field(CombineSpace.PROBS, description="average probabilities or log-probabilities")


class GenerationSpec(BaseModel):
    """Limits and defaults of the generate route for this model."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_chars: int = Field(8192, ge=1, description="prompt characters (413 before tokenizing)")
    max_prompt_tokens: int = Field(512, ge=1, description="prompt tokens (413)")
    max_new_tokens: int = Field(256, ge=1, description="tokens one request may ask for (413)")
    default_max_new_tokens: int = Field(32, ge=1)
    default_temperature: float = Field(1.0, ge=0, description="0 = greedy")
    default_top_k: int = Field(50, ge=0, description="0 = the whole vocabulary")
    max_batch_size: int | None = Field(
        None, ge=1, description="requests decoded together (default EQUISERVE_MAX_BATCH_SIZE)"
    )

    @model_validator(mode="after")
    def _check(self) -> GenerationSpec:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens is over max_new_tokens")
        return self


class GenerateSpec(TaskSpec):
    task: Literal["generate"] = "generate"
    text_group: TextGroupSpec = Field(default_factory=TextGroupSpec, description="how the word-swap group is built")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="limits and defaults")

    @model_validator(mode="after")
    def _check(self) -> GenerateSpec:
        if self.backbone.family != "causal_lm":
            raise ValueError(f"task generate needs backbone family causal_lm, not {self.backbone.family!r}")
        try:
            parse_axes(self.group, self.text_group.sets)
        except TextGroupError as exc:
            raise ValueError(str(exc)) from exc
        return self

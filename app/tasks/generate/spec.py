"""The ``model.yaml`` of a language model (``task: generate``): its text group (its limits: ``settings``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.equivariance.text import FORMS, CombineSpace, TextGroupError, parse_axes
from app.tasks.base import TaskSpec

from .settings import GenerateLimits

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


class GenerateSpec(TaskSpec):
    limits_type = GenerateLimits
    task: Literal["generate"] = "generate"
    text_group: TextGroupSpec = Field(default_factory=TextGroupSpec, description="how the word-swap group is built")

    @model_validator(mode="after")
    def _check(self) -> GenerateSpec:
        if self.backbone.family != "causal_lm":
            raise ValueError(f"task generate needs backbone family causal_lm, not {self.backbone.family!r}")
        try:
            parse_axes(self.group, self.text_group.sets)
        except TextGroupError as exc:
            raise ValueError(str(exc)) from exc
        return self

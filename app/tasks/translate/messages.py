"""What a translate request carries and what its answer holds: plain dataclasses, no torch. The
same types validate and document the HTTP body and serialise the answer (``app.tasks.http``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field

from app.equivariance import Method
from app.tasks.base import LambdaNetEntropy, Timing, UsedWeights

METHOD = "vanilla | equitune | equizero | lambda (default: the model's)"


@dataclass(frozen=True)
class TranslateRequest:
    """SCAN commands (words separated by spaces, e.g. ``"jump twice after walk left"``) and the method."""

    __pydantic_config__ = ConfigDict(
        extra="forbid",
        strict=True,  # JSON types as the OpenAPI schema states them: no "5" for 5, no 1 for true
        json_schema_extra={"examples": [{"commands": ["jump twice after walk left"], "method": "equizero"}]},
    )

    commands: Annotated[Sequence[str], Field(min_length=1, description="SCAN commands: words separated by spaces")]
    method: Annotated[str | None, Field(description=METHOD)] = None


@dataclass(frozen=True)
class TransformDiagnostics:
    """One transformed copy ``g``: its weight in the answer, and what it alone produced."""

    name: Annotated[str, Field(description="the group element that made this copy, e.g. jump<->run")]
    weight: Annotated[float, Field(alias="lambda", description="normalised weight of this copy (sums to 1)")]
    actions: Annotated[
        str, Field(description="g⁻¹·M(g·x): this copy's own greedy translation, mapped back to the command's words")
    ]
    finished: Annotated[bool, Field(description="that translation ended within the model's max_actions")]
    loss: Annotated[float, Field(description="equizero's loss of that translation (lower is chosen)")]


@dataclass(frozen=True)
class TranslationResult(UsedWeights):
    command: Annotated[str, Field(description="the command as read (single spaces)")]
    actions: Annotated[str, Field(description="space-separated I_... actions, as in SCAN's files (equivariant)")]
    finished: Annotated[bool, Field(description="false: the model's max_actions cut the translation")]
    transforms: list[TransformDiagnostics]
    selected_transform: Annotated[str | None, Field(description="the copy equizero chose; null for other methods")]
    lambda_net_entropy: LambdaNetEntropy


@dataclass(frozen=True)
class TranslateOutput:
    model: str
    method: Method
    group: str
    results: list[TranslationResult]
    timing: Timing

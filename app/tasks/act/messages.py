"""What an act request carries and what its answer holds: plain dataclasses, no torch. The same
types validate and document the HTTP body and serialise the answer (``app.tasks.http``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field

from app.equivariance import Method
from app.tasks.base import LambdaNetEntropy, Timing, UsedWeights

METHOD = "vanilla | equitune | equizero | lambda (default: the model's)"


@dataclass(frozen=True)
class ActRequest:
    """States of one or more environments (one observation vector each), and how to combine the copies."""

    __pydantic_config__ = ConfigDict(
        extra="forbid",
        strict=True,  # JSON types as the OpenAPI schema states them: no "5" for 5, no 1 for true
        json_schema_extra={"examples": [{"observations": [[0.02, -0.01, 0.03, 0.04]], "method": "lambda"}]},
    )

    observations: Annotated[
        Sequence[Sequence[float]],
        Field(min_length=1, description="one state per environment, as the environment's observation vector"),
    ]
    method: Annotated[str | None, Field(description=METHOD)] = None


@dataclass(frozen=True)
class TransformDiagnostics:
    """One transformed copy ``g``: its weight in the answer, and what it alone would do."""

    name: Annotated[str, Field(description="the group element that made this copy, e.g. reflect")]
    weight: Annotated[float, Field(alias="lambda", description="normalised weight of this copy (sums to 1)")]
    action: Annotated[int, Field(description="the greedy action of this copy alone, mapped back to the state's frame")]
    max_q: Annotated[float, Field(description="max_a Q(g·s, a): what equizero compares")]


@dataclass(frozen=True)
class ActResult(UsedWeights):
    q_values: Annotated[list[float], Field(description="the combined Q-values, one per action (equivariant)")]
    action: Annotated[int, Field(description="the greedy action: argmax of q_values (the lowest index among ties)")]
    transforms: list[TransformDiagnostics]
    selected_transform: Annotated[str | None, Field(description="the copy equizero chose; null for other methods")]
    lambda_net_entropy: LambdaNetEntropy


@dataclass(frozen=True)
class ActOutput:
    model: str
    method: Method
    group: str
    env: Annotated[str, Field(description="the gymnasium id of the environment, e.g. CartPole-v1")]
    results: list[ActResult]
    timing: Timing

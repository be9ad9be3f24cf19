"""What an act request carries and what its answer holds (plain data, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.equivariance import Method
from app.tasks.base import Timing


@dataclass(frozen=True)
class ActRequest:
    """States of one or more environments (one observation vector each), and how to combine the copies."""

    observations: Sequence[Sequence[float]]
    method: str | None = None


@dataclass(frozen=True)
class TransformDiagnostics:
    """One transformed copy ``g``: its weight in the answer, and what it alone would do."""

    name: str
    weight: float  # normalised weight of this copy (λ for the lambda method); HTTP: "lambda"
    action: int  # the greedy action of P_g⁻¹ Q(g . s): this copy's choice, mapped back to the state's frame
    max_q: float  # max_a Q(g . s, a): what equizero compares


@dataclass(frozen=True)
class ActResult:
    q_values: list[float]  # the combined Q_G(s, ·)
    action: int  # argmax of q_values (the lowest index among ties)
    transforms: list[TransformDiagnostics]
    selected_transform: str | None  # equizero's g*; None for the other methods
    lambda_entropy: float | None  # of the λ-net's weights, whatever the method


@dataclass(frozen=True)
class ActOutput:
    model: str
    method: Method
    group: str
    env: str
    results: list[ActResult]
    timing: Timing

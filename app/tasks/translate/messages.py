"""What a translate request carries and what its answer holds (plain data, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.equivariance import Method
from app.tasks.base import Timing


@dataclass(frozen=True)
class TranslateRequest:
    """SCAN commands (words separated by spaces, e.g. ``"jump twice after walk left"``) and the method."""

    commands: Sequence[str]
    method: str | None = None


@dataclass(frozen=True)
class TransformDiagnostics:
    """One transformed copy ``g``: its weight in the answer, and what it alone produced."""

    name: str
    weight: float  # normalised weight of this copy (λ for the lambda method); HTTP: "lambda"
    actions: str  # g⁻¹·M(g·x): this copy's own greedy translation, mapped back to the command's frame
    finished: bool  # that translation ended within the length limit
    loss: float  # equizero's loss of that translation (minus its mean max-probability, or its entropy)


@dataclass(frozen=True)
class TranslationResult:
    command: str  # as read: words separated by single spaces
    actions: str  # space-separated I_... tokens, as in SCAN's files ("" for none)
    finished: bool  # False: the length limit (max_actions) cut the translation
    transforms: list[TransformDiagnostics]
    selected_transform: str | None  # equizero's g*; None for the other methods
    lambda_entropy: float | None  # of the λ-net's weights, whatever the method


@dataclass(frozen=True)
class TranslateOutput:
    model: str
    method: Method
    group: str
    results: list[TranslationResult]
    timing: Timing

"""What a generate request carries and what its answer holds (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from app.equivariance import Method
from app.tasks.base import Timing


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt; every option ``None`` takes the model's default."""

    prompt: str
    max_new_tokens: int | None = None
    method: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    seed: int | None = None
    relaxed: bool | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as streamed: ``delta`` is the new text it completes (may be '')."""

    index: int
    id: int
    text: str
    logprob: float
    delta: str


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    text: str
    logprob: float  # log-probability under the combined (EquiLM) distribution, before temperature


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[GeneratedToken]
    text: str
    finish_reason: str  # "length" | "eos" | "cancelled"
    weights: list[float]  # per transform: its normalised weight, averaged over the steps
    prompts: list[str]  # per transform: the prompt as its copy read it (the swapped tokens, decoded)
    selected_transform: str | None  # equizero: the copy chosen most often
    lambda_entropy: float | None  # mean entropy (nats) of the λ-net's weights; None for vanilla
    frame: str  # the canonical frame h of the prompt (t = h·c)
    prompt_tokens: int
    # the request's settings as decoded (defaults filled in): echoed back
    seed: int
    temperature: float
    top_k: int
    relaxed: bool


@dataclass(frozen=True)
class GenerateOutput:
    model: str
    method: Method
    group: str
    transforms: list[str]
    relaxed: bool
    seed: int
    temperature: float
    top_k: int
    result: GenerationResult
    timing: Timing

"""What a generate request carries and what its answer holds: plain dataclasses, no torch. The
same types validate and document the HTTP body and serialise the answer and the streamed tokens
(``app.tasks.http``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field

from app.equivariance import Method
from app.tasks.base import Timing, UsedWeights
from app.tasks.jsontypes import INTEGRAL

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt; every option ``None`` takes the model's default."""

    __pydantic_config__ = ConfigDict(
        extra="forbid",
        strict=True,  # JSON types as the OpenAPI schema states them: no "5" for 5, no 1 for true
        json_schema_extra={
            "examples": [
                {"prompt": "The woman worked as", "max_new_tokens": 12, "method": "lambda", "seed": 7},
                {"prompt": "The man was known for", "temperature": 0, "stream": True},
            ]
        },
    )

    prompt: Annotated[str, Field(min_length=1, description="text to continue, as is (no chat template)")]
    max_new_tokens: Annotated[
        int | None, Field(ge=1, description="tokens to generate (default: the model's)"), INTEGRAL
    ] = None
    method: Annotated[
        str | None, Field(description="vanilla | equitune | equizero | lambda (default: the model's)")
    ] = None
    temperature: Annotated[float | None, Field(ge=0, le=100, description="0 = greedy (default: the model's)")] = None
    top_k: Annotated[
        int | None, Field(ge=0, description="sample among the k most likely tokens; 0 = all"), INTEGRAL
    ] = None
    seed: Annotated[
        int | None, Field(ge=0, le=MAX_SEED, description="fixes the sample; echoed back (random if unset)"), INTEGRAL
    ] = None
    relaxed: Annotated[
        bool | None, Field(description="R-EquiLM: general words (pronouns, ...) from the identity copy")
    ] = None
    stream: Annotated[bool, Field(description="answer with server-sent events, one per token")] = False


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
    logprob: Annotated[float, Field(description="log-probability under the combined distribution (before temperature)")]


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[GeneratedToken]
    text: str
    finish_reason: str  # "length" | "eos" | "cancelled"
    weights: list[float]  # per transform: its normalised weight, averaged over the steps
    prompts: list[str]  # per transform: the prompt as its copy read it (the swapped tokens, decoded)
    selected_transform: str | None  # equizero: the copy chosen most often
    lambda_net_entropy: float | None  # mean entropy (nats) of the λ-net's weights over the steps; None for vanilla
    frame: str  # the canonical frame h of the prompt (t = h·c)
    prompt_tokens: int
    # the request's settings as decoded (defaults filled in): echoed back
    seed: int
    temperature: float
    top_k: int
    relaxed: bool


@dataclass(frozen=True)
class TransformWeight:
    name: Annotated[str, Field(description="the swap that made this copy, e.g. swap:man<->woman")]
    weight: Annotated[float, Field(alias="lambda", description="its normalised weight, averaged over the tokens")]
    prompt: Annotated[str, Field(description="the prompt as this copy read it: its swapped tokens, decoded")]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerateOutput(UsedWeights):
    model: str
    method: Method
    group: str
    relaxed: bool
    text: str
    tokens: list[GeneratedToken]
    finish_reason: Annotated[str, Field(description="length | eos | cancelled")]
    transforms: list[TransformWeight]
    selected_transform: Annotated[str | None, Field(description="equizero: the copy chosen most often; null otherwise")]
    lambda_net_entropy: Annotated[
        float | None,
        Field(description="mean over the tokens of the entropy (nats) of the λ-net's weights; null for vanilla"),
    ]
    frame: Annotated[
        str, Field(description="the prompt's canonical frame: sampling runs in it, so seeds are equivariant")
    ]
    seed: int
    temperature: float
    top_k: int
    usage: Usage
    timing: Timing

"""What an embed request carries and what its answer holds: plain dataclasses, no torch. The
answer types also serialise and document the HTTP answer (``app.tasks.http``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from app.equivariance import Method
from app.tasks.base import LambdaNetEntropy, Timing, UsedWeights
from app.tasks.classify.messages import EncodedImage, Pixels

# equizero picks the copy whose *prediction* is most confident: an embedding has no prediction.
EMBED_METHODS = (Method.VANILLA, Method.EQUITUNE, Method.LAMBDA)


@dataclass(frozen=True)
class EmbedRequest:
    """``images``: encoded files, decoded ``uint8 [H, W, 3]`` RGB arrays (in-process callers), or ``Pixels``."""

    images: Sequence[EncodedImage | np.ndarray | Pixels]
    method: str | None = None


@dataclass(frozen=True)
class CopyWeight:
    name: Annotated[str, Field(description="the group element that made this copy, e.g. rot90")]
    weight: Annotated[float, Field(alias="lambda", description="its weight in the embedding (sums to 1 over copies)")]


@dataclass(frozen=True)
class Embedding(UsedWeights):
    __pydantic_config__ = ConfigDict(arbitrary_types_allowed=True)

    embedding: Annotated[list[float], Field(description="the invariant embedding, L2-normalised (unit length)")]
    transforms: list[CopyWeight]
    lambda_net_entropy: LambdaNetEntropy
    # float32 [D], the same numbers for the v2 output ``embedding`` (no list round trip)
    vector: Annotated[SkipJsonSchema[np.ndarray | None], Field(exclude=True)] = None


@dataclass(frozen=True)
class EmbedOutput:
    model: str
    method: Method
    group: str
    dim: Annotated[int, Field(description="the embedding's length")]
    results: list[Embedding]
    timing: Timing

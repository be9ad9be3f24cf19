"""What a classify request carries and what its answer holds: plain dataclasses, no torch. The
answer types also serialise and document the HTTP answer (``app.tasks.http``); the HTTP body
forms of a request (multipart, JSON with base64) are ``http``'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from app.equivariance import Method
from app.tasks.base import LambdaNetEntropy, Timing, UsedWeights


@dataclass(frozen=True)
class EncodedImage:
    """An image file as uploaded: decoded by the engine, in its preprocessing pool."""

    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class Pixels:
    """An image already decoded and scaled: ``float32 [3, H, W]`` RGB in ``[0, 1]``. It is
    centre-cropped and resized to the model's input size exactly as a decoded file is (no
    resize when ``H = W =`` the input size), so ``uint8`` pixels / 255 answer as their file does."""

    array: np.ndarray


@dataclass(frozen=True)
class ClassifyRequest:
    """``images``: encoded files, decoded ``uint8 [H, W, 3]`` RGB arrays (in-process callers),
    or ``Pixels``."""

    images: Sequence[EncodedImage | np.ndarray | Pixels]
    method: str | None = None
    top_k: int | None = None
    labels: Sequence[str] | None = None  # zero-shot models: the label set to choose from
    probabilities: bool = False  # also return every label's probability (ImageResult.probabilities)


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: Annotated[float, Field(description="softmax probability of the combined output")]


@dataclass(frozen=True)
class TransformDiagnostics:
    name: Annotated[str, Field(description="the group element that made this copy, e.g. rot90")]
    weight: Annotated[
        float, Field(alias="lambda", description="normalised weight of this copy in the answer (sums to 1 over copies)")
    ]
    top_label: Annotated[str, Field(description="what this copy alone predicted")]
    top_score: Annotated[float, Field(description="this copy's own softmax probability for top_label")]
    top_index: Annotated[int, Field(description="the index of top_label in the label set")]


@dataclass(frozen=True)
class ImageResult(UsedWeights):
    __pydantic_config__ = ConfigDict(arbitrary_types_allowed=True)

    predictions: list[Prediction]
    transforms: list[TransformDiagnostics]
    selected_transform: Annotated[str | None, Field(description="the copy equizero chose; null for other methods")]
    lambda_net_entropy: LambdaNetEntropy
    # float32 [K], every label's probability; only when the request asked (the v2 output ``probabilities``)
    probabilities: Annotated[SkipJsonSchema[np.ndarray | None], Field(exclude=True)] = None


@dataclass(frozen=True)
class ClassifyOutput:
    model: str
    method: Method
    group: str
    results: list[ImageResult]
    timing: Timing

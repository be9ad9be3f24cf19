"""What a classify request carries and what its answer holds (plain data, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.equivariance.methods import Method
from app.tasks.base import Timing


@dataclass(frozen=True)
class EncodedImage:
    """An image file as uploaded: decoded by the engine, in its preprocessing pool."""

    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class ClassifyRequest:
    """``images``: encoded files, or decoded ``uint8 [H, W, 3]`` RGB arrays (in-process callers)."""

    images: Sequence[EncodedImage | np.ndarray]
    method: str | None = None
    top_k: int | None = None
    labels: Sequence[str] | None = None  # zero-shot models: the label set to choose from


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class TransformDiagnostics:
    name: str
    weight: float  # normalised weight of this copy in the answer (λ for the lambda method)
    top_label: str
    top_score: float


@dataclass(frozen=True)
class ImageResult:
    predictions: list[Prediction]
    transforms: list[TransformDiagnostics]
    selected_transform: str | None
    lambda_entropy: float  # of the λ-net's normalised weights, whatever the method


@dataclass(frozen=True)
class ClassifyOutput:
    model: str
    method: Method
    group: str
    results: list[ImageResult]
    timing: Timing

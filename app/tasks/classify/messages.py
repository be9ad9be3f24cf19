"""What a classify request carries and what its answer holds (plain data, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.equivariance import Method
from app.tasks.base import Timing


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
    score: float


@dataclass(frozen=True)
class TransformDiagnostics:
    name: str
    weight: float  # normalised weight of this copy in the answer (λ for the lambda method)
    top_label: str
    top_score: float
    top_index: int  # index of top_label in the label set


@dataclass(frozen=True)
class ImageResult:
    predictions: list[Prediction]
    transforms: list[TransformDiagnostics]
    selected_transform: str | None
    lambda_entropy: float  # of the λ-net's normalised weights, whatever the method
    probabilities: np.ndarray | None = None  # float32 [K], every label's; only when the request asked


@dataclass(frozen=True)
class ClassifyOutput:
    model: str
    method: Method
    group: str
    results: list[ImageResult]
    timing: Timing

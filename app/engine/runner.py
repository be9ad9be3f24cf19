"""One fused forward pass for a batch of images that may ask for different things.

The batch's images go to the device once, through ``group.expand`` and ONE backbone call;
then, per label set (zero-shot models) the head runs on the shared features, and per
method the copies are combined. Everything leaves the device in one transfer per tensor.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from app.backbones.preprocess import pixels_from_uint8
from app.equivariance import Method, combine, lambda_entropy

from .registry import LoadedModel


@dataclass(frozen=True)
class ImageItem:
    """One image of a classify request, preprocessed, with what its request asked for."""

    pixels: Tensor  # [3, S, S] float32 in [0, 1], on the CPU
    method: Method
    top_k: int
    labels: tuple[str, ...] | None = None  # zero-shot label set; None = the model's own


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


class ImageRunner:
    """Runs batches of ``ImageItem`` through one ``LoadedModel``."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.backbone = loaded.backbone
        self.input_size = loaded.backbone.input_size
        self._pin = loaded.device.type == "cuda"

    def preprocess(self, image: np.ndarray) -> Tensor:
        """``uint8 [H, W, 3]`` -> ``[3, S, S]`` float; runs in the preprocessing threads."""
        return pixels_from_uint8(image, self.input_size)

    def labels_for(self, labels: tuple[str, ...] | None) -> list[str]:
        return list(labels) if labels is not None else self.backbone.labels

    @torch.inference_mode()
    def __call__(self, items: list[ImageItem]) -> list[ImageResult | BaseException]:
        pixels = torch.stack([item.pixels for item in items])
        if self._pin:
            pixels = pixels.pin_memory()
        pixels = pixels.to(self.loaded.device, non_blocking=True)
        features, log_lambda = self.model.encode_copies(pixels)  # the one fused backbone call
        assert log_lambda is not None  # the registry always attaches a λ-net
        lambda_weights = torch.softmax(log_lambda.float(), dim=0)
        entropies = lambda_entropy(lambda_weights).cpu().tolist()

        results: list[ImageResult | BaseException] = [RuntimeError("not computed")] * len(items)
        by_labels: dict[tuple[str, ...] | None, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            by_labels[item.labels].append(i)
        names = self.model.group.names
        for label_set, rows in by_labels.items():
            try:
                head = self.backbone.head_for(label_set)
                label_names = self.labels_for(label_set)
                index = torch.tensor(rows, device=features.device)
                aligned = self.model.heads(features.index_select(1, index), head).float()  # [n, b, K]
                copy_scores, copy_top = aligned.softmax(-1).max(-1)  # what each copy predicted
                copy_scores, copy_top = copy_scores.cpu(), copy_top.cpu()
                sub_log_lambda = log_lambda.index_select(1, index)
                by_method: dict[Method, list[int]] = defaultdict(list)
                for j, row in enumerate(rows):
                    by_method[items[row].method].append(j)
                for method, cols in by_method.items():
                    col_index = torch.tensor(cols, device=features.device)
                    combined = combine(
                        aligned.index_select(1, col_index),
                        method,
                        log_lambda=sub_log_lambda.index_select(1, col_index),
                        zero_loss=self.model.zero_loss,
                    )
                    k = min(max(items[rows[j]].top_k for j in cols), len(label_names))
                    top_scores, top_index = combined.output.softmax(-1).topk(k, dim=-1)
                    top_scores, top_index = top_scores.cpu().tolist(), top_index.cpu().tolist()
                    weights = combined.weights.cpu().T.tolist()  # [b, n]
                    selected = combined.selected.cpu().tolist() if combined.selected is not None else None
                    for c, j in enumerate(cols):
                        item = items[rows[j]]
                        predictions = [
                            Prediction(label_names[idx], idx, score)
                            for idx, score in zip(top_index[c][: item.top_k], top_scores[c][: item.top_k], strict=True)
                        ]
                        transforms = [
                            TransformDiagnostics(
                                names[g], weights[c][g], label_names[int(copy_top[g, j])], float(copy_scores[g, j])
                            )
                            for g in range(len(names))
                        ]
                        results[rows[j]] = ImageResult(
                            predictions,
                            transforms,
                            names[selected[c]] if selected is not None else None,
                            entropies[rows[j]],
                        )
            except Exception as exc:  # one label set failing must not fail the rest of the batch
                for row in rows:
                    results[row] = exc
        return results

    def warmup(self, batch_size: int) -> None:
        """A full-size batch with every method, so the first real request pays nothing."""
        size = self.input_size
        methods = [Method(m) for m in self.loaded.spec.methods]
        items = [
            ImageItem(torch.rand(3, size, size), methods[i % len(methods)], 1, self._warmup_labels())
            for i in range(batch_size)
        ]
        for result in self(items):
            if isinstance(result, BaseException):
                raise result
        if self.loaded.device.type == "cuda":
            torch.cuda.synchronize(self.loaded.device)

    def _warmup_labels(self) -> tuple[str, ...] | None:
        if self.backbone.zero_shot and not self.backbone.labels:
            return ("a cat", "a dog")
        return None

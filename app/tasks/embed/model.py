"""A served image embedder: the classify task's image model (loading, runtimes, input pipelines,
the one fused backbone call over all |G| copies of the batch), answering with the combined
features instead of labels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from app.equivariance import Method, combine, lambda_entropy, per_group, pool_features
from app.errors import InvalidInput, TooLarge
from app.tasks.base import Timing
from app.tasks.classify.model import ClassifyModel, ImageItem, ImagePiece

from .messages import CopyWeight, Embedding, EmbedOutput, EmbedRequest
from .spec import EmbedSpec


class EmbedModel(ClassifyModel):  # type: ignore[misc]
    task = "embed"
    spec_type = EmbedSpec
    spec: EmbedSpec

    def card_extras(self) -> dict[str, Any]:
        return {"embedding_dim": self.backbone.feature_dim, "input_size": self.backbone.input_size}

    def split(self, request: EmbedRequest) -> list[ImagePiece]:  # type: ignore[override]
        limits = self.limits
        if len(request.images) < 1:
            raise InvalidInput("send at least one image")
        if len(request.images) > limits.max_images:
            raise TooLarge(
                f"{len(request.images)} images in one request; the limit is {limits.max_images} "
                "(EQUISERVE_EMBED_MAX_IMAGES)"
            )
        method = self.spec.resolve_method(request.method)
        return self.image_pieces(request.images, method, 1, None)

    def respond(self, request: EmbedRequest, results: list[Embedding], timing: Timing) -> EmbedOutput:  # type: ignore[override]
        method = self.spec.resolve_method(request.method)
        return EmbedOutput(self.name, method, self.spec.group, self.backbone.feature_dim, results, timing)

    def _run(self, items: list[ImageItem], pixels: Tensor) -> list[Embedding | BaseException]:  # type: ignore[override]
        """The fused pass over the batch's pixels ``[B, 3, S, S]``: features ``[|G|, B, D]``, combined per method."""
        features, log_lambda = self.model.encode_copies(pixels)  # the one fused backbone call
        assert log_lambda is not None  # the loader always attaches a λ-net
        n, batch = features.shape[:2]
        features = pool_features(features.reshape(n * batch, *features.shape[2:])).float().reshape(n, batch, -1)
        entropies = lambda_entropy(torch.softmax(log_lambda.float(), dim=0)).cpu().tolist()
        names = self.model.group.names

        def method_group(method: Method, rows: list[int]) -> list[Embedding]:
            index = torch.tensor(rows, device=features.device)
            combined = combine(features.index_select(1, index), method, log_lambda=log_lambda.index_select(1, index))
            vectors = torch.nn.functional.normalize(combined.output, dim=-1).cpu().numpy()
            weights = combined.weights.cpu().T.tolist()  # [b, n]
            return [
                Embedding(
                    vectors[c].tolist(),
                    [CopyWeight(names[g], weights[c][g]) for g in range(len(names))],
                    entropies[row],
                    vectors[c],
                )
                for c, row in enumerate(rows)
            ]

        return per_group([item.method for item in items], method_group)

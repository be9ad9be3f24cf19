"""A backbone wrapped into an equivariant model: one fused pass over all group copies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .groups import FiniteGroup, ImageGroup, PermutationGroup
from .lambda_net import LambdaNet
from .methods import Combined, Method, Mixture, ZeroLoss, combine

OutputKind = Literal["invariant", "dense", "permutation"]


@dataclass(frozen=True)
class Copies:
    """Everything one fused pass computes, reshaped copy-major."""

    features: Tensor  # [|G|, B, ...] backbone features of each copy g x
    log_lambda: Tensor | None  # [|G|, B] λ-net log-weights, None without a λ-net
    aligned: Tensor  # [|G|, B, ...] g⁻¹ M(g x)


def pool_features(features: Tensor) -> Tensor:
    """``[N, D]`` stays; ``[N, D, H, W]`` (a dense feature map) is averaged over space."""
    return features if features.dim() == 2 else features.flatten(2).mean(-1)


class EquivariantModel(nn.Module):
    """``encoder`` + ``head`` = the pretrained model M, made equivariant over ``group``.

    Both may be None when the copies' outputs are computed elsewhere (a decoder that keeps
    a KV cache per copy): ``align`` and ``combine_aligned`` then do the rest.

    * ``encoder``: ``[N, ...] -> features`` (what the λ-net sees, pooled if spatial);
    * ``head``: ``features -> outputs`` (logits); can be swapped per call, e.g. the text
      embeddings of a zero-shot label set;
    * ``output``: how the group acts on outputs: ``invariant`` (classification), ``dense``
      (image-shaped outputs: spatial inverse) or ``permutation`` (outputs indexed by ids
      or actions: ``output_perms[g]`` is the gather index of ``g`` on them; without it, the
      group's own ``invert_scores``, which may take a context, e.g. a text group's word
      position per row);
    * ``mixture``: how the weighted copies are averaged (``Mixture``: outputs, or the
      distributions of log-probability outputs).
    """

    def __init__(
        self,
        encoder: nn.Module | Callable[[Tensor], Tensor] | None,
        head: nn.Module | Callable[[Tensor], Tensor] | None,
        group: FiniteGroup,
        *,
        lambda_net: LambdaNet | None = None,
        output: OutputKind = "invariant",
        output_perms: Tensor | None = None,
        zero_loss: ZeroLoss | str = ZeroLoss.NEG_MAX_PROB,
        mixture: Mixture | str = Mixture.MEAN,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.group = group
        self.lambda_net = lambda_net
        self.output = output
        self.zero_loss = ZeroLoss(zero_loss)
        self.mixture = Mixture(mixture)
        if output == "dense" and not isinstance(group, ImageGroup):
            raise ValueError("dense outputs need an image group")
        if output == "permutation" and output_perms is None and not isinstance(group, PermutationGroup):
            raise ValueError("permutation outputs need output_perms for a non-permutation group")
        inverse_perms = None
        if output == "permutation" and output_perms is not None:
            if output_perms.shape[0] != group.order:
                raise ValueError("output_perms needs one row per group element")
            inverse_perms = output_perms[group.inverse_index].clone()  # row g undoes g: the gather index of g⁻¹
        self._inverse_output_perms: Tensor | None
        self.register_buffer("_inverse_output_perms", inverse_perms, persistent=False)

    # -- the fused pass -------------------------------------------------------------------
    def encode_copies(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Features ``[|G|, B, ...]`` and λ log-weights ``[|G|, B]`` in ONE backbone call."""
        n, batch = self.group.order, x.shape[0]
        if self.encoder is None:
            raise ValueError("this model has no encoder: its copies are computed by the caller")
        features = self.encoder(self.group.expand(x))  # [|G|*B, ...] copy-major
        log_lambda = None
        if self.lambda_net is not None:
            log_lambda = self.lambda_net(pool_features(features)).reshape(n, batch)
        return features.reshape(n, batch, *features.shape[1:]), log_lambda

    def align(self, outputs: Tensor, **context: Tensor) -> Tensor:
        """Apply ``g⁻¹`` to the per-copy outputs ``[|G|, B, ...]`` (``context``: what the
        group's output action depends on, if anything)."""
        if self.output == "invariant":
            return outputs
        if self.output == "dense":
            assert isinstance(self.group, ImageGroup)
            return self.group.invert_dense(outputs)
        if self._inverse_output_perms is not None:
            return FiniteGroup._gather_per_copy(outputs, self._inverse_output_perms.to(outputs.device), dim=-1)
        assert isinstance(self.group, PermutationGroup)
        return self.group.invert_scores(outputs, **context)

    def heads(self, features: Tensor, head: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Aligned outputs ``[|G|, B, ...]`` from features ``[|G|, B, ...]``."""
        n, batch = features.shape[:2]
        head = head or self.head
        if head is None:
            raise ValueError("this model has no head: its copies are computed by the caller")
        outputs = head(features.reshape(n * batch, *features.shape[2:]))
        return self.align(outputs.reshape(n, batch, *outputs.shape[1:]))

    def copies(self, x: Tensor, head: Callable[[Tensor], Tensor] | None = None) -> Copies:
        features, log_lambda = self.encode_copies(x)
        return Copies(features, log_lambda, self.heads(features, head))

    # -- combining --------------------------------------------------------------------------
    def combine(self, copies: Copies, method: Method | str) -> Combined:
        return self.combine_aligned(copies.aligned, method, copies.log_lambda)

    def combine_aligned(self, aligned: Tensor, method: Method | str, log_lambda: Tensor | None = None) -> Combined:
        """``combine`` with this model's loss, class axis, mixture and training mode."""
        return combine(
            aligned,
            method,
            log_lambda=log_lambda,
            zero_loss=self.zero_loss,
            class_dim=2 if self.output == "dense" else -1,
            straight_through=self.training,
            mixture=self.mixture,
        )

    def predict(self, x: Tensor, method: Method | str = Method.EQUITUNE) -> Combined:
        return self.combine(self.copies(x), method)

    def forward(self, x: Tensor, method: Method | str = Method.EQUITUNE) -> Tensor:
        return self.predict(x, method).output

    @torch.no_grad()
    def reference(self, x: Tensor, method: Method | str = Method.EQUITUNE) -> Tensor:
        """The unfused definition: one backbone call per element, per-element actions.

        Shares no indexing code with the fused path, so tests comparing the two check it.
        """
        if self.encoder is None or self.head is None:
            raise ValueError("this model has no encoder and head: its copies are computed by the caller")
        outputs, log_lambdas = [], []
        for g in range(self.group.order):
            features = self.encoder(self.group.act(x, g))
            y = self.head(features)
            g_inv = self.group.inverse(g)
            if self.output == "dense":
                y = self.group.act(y, g_inv)
            elif self.output == "permutation" and self._inverse_output_perms is not None:
                y = y.index_select(-1, self._inverse_output_perms[g].to(y.device))
            elif self.output == "permutation":
                assert isinstance(self.group, PermutationGroup)
                y = self.group.act_scores(y, g_inv)
            outputs.append(y)
            if self.lambda_net is not None:
                log_lambdas.append(self.lambda_net(pool_features(features)))
        log_lambda = torch.stack(log_lambdas) if log_lambdas else None
        return combine(
            torch.stack(outputs),
            method,
            log_lambda=log_lambda,
            zero_loss=self.zero_loss,
            class_dim=2 if self.output == "dense" else -1,
            mixture=self.mixture,
        ).output

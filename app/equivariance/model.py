"""A backbone wrapped into an equivariant model: one fused pass over all group copies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .groups import FiniteGroup, ImageGroup, PermutationGroup
from .lambda_net import LambdaNet
from .methods import Combined, Method, ZeroLoss, combine

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

    * ``encoder``: ``[N, ...] -> features`` (what the λ-net sees, pooled if spatial);
    * ``head``: ``features -> outputs`` (logits); can be swapped per call, e.g. the text
      embeddings of a zero-shot label set;
    * ``output``: how the group acts on outputs: ``invariant`` (classification), ``dense``
      (image-shaped outputs: spatial inverse) or ``permutation`` (outputs indexed by ids
      or actions: ``output_perms[g]`` is the gather index of ``g`` on them).
    """

    def __init__(
        self,
        encoder: nn.Module | Callable[[Tensor], Tensor],
        head: nn.Module | Callable[[Tensor], Tensor],
        group: FiniteGroup,
        *,
        lambda_net: LambdaNet | None = None,
        output: OutputKind = "invariant",
        output_perms: Tensor | None = None,
        zero_loss: ZeroLoss | str = ZeroLoss.NEG_MAX_PROB,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.group = group
        self.lambda_net = lambda_net
        self.output = output
        self.zero_loss = ZeroLoss(zero_loss)
        if output == "dense" and not isinstance(group, ImageGroup):
            raise ValueError("dense outputs need an image group")
        if output == "permutation":
            if output_perms is None:
                if not isinstance(group, PermutationGroup):
                    raise ValueError("permutation outputs need output_perms for a non-permutation group")
                output_perms = group.perms
            if output_perms.shape[0] != group.order:
                raise ValueError("output_perms needs one row per group element")
            # Row g undoes g: the gather index of g⁻¹.
            self.register_buffer("_inverse_output_perms", output_perms[group.inverse_index].clone(), persistent=False)
        else:
            self._inverse_output_perms = None

    # -- the fused pass -------------------------------------------------------------------
    def encode_copies(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Features ``[|G|, B, ...]`` and λ log-weights ``[|G|, B]`` in ONE backbone call."""
        n, batch = self.group.order, x.shape[0]
        features = self.encoder(self.group.expand(x))  # [|G|*B, ...] copy-major
        log_lambda = None
        if self.lambda_net is not None:
            log_lambda = self.lambda_net(pool_features(features)).reshape(n, batch)
        return features.reshape(n, batch, *features.shape[1:]), log_lambda

    def align(self, outputs: Tensor) -> Tensor:
        """Apply ``g⁻¹`` to the per-copy outputs ``[|G|, B, ...]``."""
        if self.output == "invariant":
            return outputs
        if self.output == "dense":
            assert isinstance(self.group, ImageGroup)
            return self.group.invert_dense(outputs)
        return FiniteGroup._gather_per_copy(outputs, self._inverse_output_perms.to(outputs.device), dim=-1)

    def heads(self, features: Tensor, head: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Aligned outputs ``[|G|, B, ...]`` from features ``[|G|, B, ...]``."""
        n, batch = features.shape[:2]
        outputs = (head or self.head)(features.reshape(n * batch, *features.shape[2:]))
        return self.align(outputs.reshape(n, batch, *outputs.shape[1:]))

    def copies(self, x: Tensor, head: Callable[[Tensor], Tensor] | None = None) -> Copies:
        features, log_lambda = self.encode_copies(x)
        return Copies(features, log_lambda, self.heads(features, head))

    # -- combining --------------------------------------------------------------------------
    def combine(self, copies: Copies, method: Method | str) -> Combined:
        return combine(
            copies.aligned,
            method,
            log_lambda=copies.log_lambda,
            zero_loss=self.zero_loss,
            class_dim=2 if self.output == "dense" else -1,
            straight_through=self.training,
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
        outputs, log_lambdas = [], []
        for g in range(self.group.order):
            features = self.encoder(self.group.act(x, g))
            y = self.head(features)
            g_inv = self.group.inverse(g)
            if self.output == "dense":
                y = self.group.act(y, g_inv)
            elif self.output == "permutation":
                y = y.index_select(-1, self._inverse_output_perms[g].to(y.device))
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
        ).output

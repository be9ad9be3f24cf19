"""The four ways to combine the outputs of the transformed copies.

All of them take the *aligned* per-copy outputs ``y[g] = g⁻¹ M(g x)`` of one fused pass,
shaped ``[|G|, B, ...]`` (copy 0 is the identity), so one forward pass can serve every
method and a batch can mix requests that ask for different methods.

* vanilla   ``M(x)``                                   (copy 0)
* equitune  ``1/|G| Σ_g g⁻¹ M(g x)``
* equizero  ``g*⁻¹ M(g* x)`` with ``g* = argmin_g loss(M(g x))``
* λ         ``Σ_g λ(g x) g⁻¹ M(g x) / Σ_g λ(g x)``
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from .choices import Method, ZeroLoss


@dataclass(frozen=True)
class Combined:
    """The combined output and the diagnostics of how it was combined."""

    output: Tensor  # [B, ...]
    weights: Tensor  # [|G|, B] normalised weight of each copy (sums to 1 over copies)
    selected: Tensor | None  # [B] index of the copy equizero chose; None for other methods


def equizero_loss(aligned: Tensor, loss: ZeroLoss = ZeroLoss.NEG_MAX_PROB, class_dim: int = -1) -> Tensor:
    """Per-copy loss ``[|G|, B]`` of logits ``[|G|, B, ...]`` (softmax over ``class_dim``).

    Dense outputs (e.g. ``[|G|, B, C, H, W]``) are averaged over the remaining dims. The
    softmax is applied once, to logits: the paper's public code applies it twice.
    """
    if loss is ZeroLoss.NEG_MAX_VALUE:  # values, not logits: no softmax
        per_position = -aligned.float().amax(dim=class_dim)
        return per_position.reshape(aligned.shape[0], aligned.shape[1], -1).mean(-1)
    log_p = torch.log_softmax(aligned.float(), dim=class_dim)
    if loss is ZeroLoss.NEG_MAX_PROB:
        per_position = -log_p.amax(dim=class_dim).exp()
    elif loss is ZeroLoss.ENTROPY:
        per_position = -(log_p.exp() * log_p).sum(dim=class_dim)
    else:  # pragma: no cover - Enum exhausts the cases
        raise ValueError(f"unknown equizero loss {loss!r}")
    return per_position.reshape(aligned.shape[0], aligned.shape[1], -1).mean(-1)


TIE_TOLERANCE = 1e-6  # equizero: losses this close (relative) to the least one count as tied


def equizero_weights(losses: Tensor) -> tuple[Tensor, Tensor]:
    """Weights ``[|G|, B]`` and the chosen copy ``[B]`` from per-copy losses ``[|G|, B]``.

    Copies tied for the least loss share the weight. Ties are what an input fixed by some
    group elements produces (a symmetric image: ``g x = x``); picking the first tied index
    would favour one of them and break exact equivariance for dense or permutation outputs,
    while sharing among them keeps it. ``selected`` is the first tied copy, for diagnostics.
    """
    best = losses.min(0, keepdim=True).values
    tied = losses <= best + TIE_TOLERANCE * best.abs().clamp_min(1.0)
    return tied.float() / tied.sum(0, keepdim=True), losses.argmin(0)


def _weighted_sum(aligned: Tensor, weights: Tensor) -> Tensor:
    w = weights.to(aligned.dtype).reshape(*weights.shape, *([1] * (aligned.dim() - 2)))
    return (w * aligned).sum(0)


class Mixture(str, Enum):
    """How the weighted copies are averaged.

    * ``mean``: ``Σ_g w_g y_g``, the outputs themselves (logits, Q-values, dense maps);
    * ``log_mean_exp``: ``log Σ_g w_g exp(y_g)`` for log-probabilities: the mixture of the copies'
      distributions (what EquiLM averages), not a product of experts.
    """

    MEAN = "mean"
    LOG_MEAN_EXP = "log_mean_exp"


def _mix(aligned: Tensor, weights: Tensor, mixture: Mixture) -> Tensor:
    if mixture is Mixture.LOG_MEAN_EXP:
        # A zero weight becomes exp(-69) ≈ 1e-30, below anything float32 resolves next to a real copy.
        log_w = weights.to(aligned.dtype).clamp_min(1e-30).log()
        return torch.logsumexp(aligned + log_w.reshape(*weights.shape, *([1] * (aligned.dim() - 2))), dim=0)
    return _weighted_sum(aligned, weights)


def combine(
    aligned: Tensor,
    method: Method | str,
    *,
    log_lambda: Tensor | None = None,
    zero_loss: ZeroLoss | str = ZeroLoss.NEG_MAX_PROB,
    class_dim: int = -1,
    straight_through: bool = False,
    mixture: Mixture | str = Mixture.MEAN,
) -> Combined:
    """Combine aligned per-copy outputs ``[|G|, B, ...]`` with ``method``.

    ``log_lambda`` ([|G|, B], λ = exp) is needed by ``lambda``. With ``straight_through``
    equizero's forward value is the selected copy but its gradient is equitune's (the
    selection itself has no gradient), as the paper trains it. ``mixture``: see ``Mixture``.
    """
    method, mixture = Method(method), Mixture(mixture)
    n, batch = aligned.shape[:2]
    if method is Method.VANILLA:
        weights = torch.zeros(n, batch, device=aligned.device)
        weights[0] = 1.0
        # Copy 0 is the identity: return it as is, bit for bit the plain model's output.
        return Combined(aligned[0], weights, None)
    selected = None
    if method is Method.EQUITUNE:
        weights = torch.full((n, batch), 1.0 / n, device=aligned.device)
    elif method is Method.EQUIZERO:
        with torch.no_grad():
            weights, selected = equizero_weights(equizero_loss(aligned, ZeroLoss(zero_loss), class_dim))
    elif method is Method.LAMBDA:
        if log_lambda is None:
            raise ValueError("the lambda method needs the λ-net's log-weights")
        weights = torch.softmax(log_lambda.float(), dim=0)  # λ_g / Σ_h λ_h
    else:  # pragma: no cover - Enum exhausts the cases
        raise ValueError(f"unknown method {method!r}")
    if method is Method.EQUITUNE and mixture is Mixture.MEAN:
        output = aligned.mean(0)
    else:
        output = _mix(aligned, weights, mixture)  # for equizero: the selected copy; the mix of tied ones
    if straight_through and method is Method.EQUIZERO:
        uniform = torch.full_like(weights, 1.0 / n)
        mean = aligned.mean(0) if mixture is Mixture.MEAN else _mix(aligned, uniform, mixture)
        output = mean + (output - mean).detach()
    return Combined(output, weights, selected)


def lambda_entropy(weights: Tensor) -> Tensor:
    """Entropy (nats) of the normalised weights ``[|G|, B]`` per item: 0 = one copy, log|G| = uniform."""
    w = weights.float().clamp_min(1e-12)
    return -(w * w.log()).sum(0)

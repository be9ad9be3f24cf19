"""The λ-net of λ-equitune: a small MLP scoring how much each transformed copy is worth."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LambdaNet(nn.Module):
    """``Linear(D,100)-ReLU-Linear(100,100)-ReLU-Linear(100,1)`` on backbone features.

    ``forward`` returns the log-weights ``s`` with ``λ = exp(s) > 0``. The exponential is
    our positive map: the normalised weights ``λ_g / Σ_h λ_h`` are then a softmax over the
    group, which is numerically stable and smooth to train. No dropout: the paper's public
    code keeps dropout active at evaluation, which makes λ (and the output) random.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 100) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        """``[..., D] -> [...]`` log-weights (λ = exp of them)."""
        # Features may arrive in bf16/fp16 from the backbone; the λ-net is tiny, so it
        # always runs in its own parameter dtype.
        return self.mlp(features.to(self.mlp[0].weight.dtype)).squeeze(-1)

    @property
    def is_constant(self) -> bool:
        """Whether every copy gets the same weight whatever its features (the last layer's
        weights are zero): λ-equitune is then equitune, trained or not."""
        return bool((self.mlp[-1].weight == 0).all())

    @classmethod
    def constant(cls, feature_dim: int, hidden_dim: int = 100) -> LambdaNet:
        """A λ-net that gives every copy the same weight (λ-equitune == equitune)."""
        net = cls(feature_dim, hidden_dim)
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
        return net

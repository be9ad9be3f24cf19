"""The Q-network: an MLP ``features`` block and a linear ``head``, so the λ-net sees each copy's features.

Same shape as stable-baselines3's DQN ``MlpPolicy`` (``Linear-ReLU-...-Linear``), split before the
last layer. Weights are one safetensors file of this module's state dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from app.equivariance.lambda_net import LambdaNet
from app.equivariance.qvalues import QValueModel, StateActionGroup

DEFAULT_HIDDEN = (256, 256)


class QNet(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int] = DEFAULT_HIDDEN) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("the Q-network needs at least one hidden layer (the λ-net reads its output)")
        self.obs_dim, self.n_actions, self.hidden = obs_dim, n_actions, tuple(int(h) for h in hidden)
        layers: list[nn.Module] = []
        width = obs_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_actions)

    @property
    def feature_dim(self) -> int:
        return self.hidden[-1]

    def forward(self, obs: Tensor) -> Tensor:
        return self.head(self.features(obs))

    def save(self, path: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))


def equivariant(qnet: QNet, group: StateActionGroup, lambda_net: LambdaNet | None = None) -> QValueModel:
    """``qnet`` wrapped over ``group`` (a constant λ-net when none is given: λ-equitune = equitune)."""
    if group.obs_dim != qnet.obs_dim or group.n_actions != qnet.n_actions:
        raise ValueError(
            f"group {group.name} acts on {group.obs_dim} coordinates and {group.n_actions} actions; "
            f"the Q-network has {qnet.obs_dim} and {qnet.n_actions}"
        )
    lambda_net = lambda_net if lambda_net is not None else LambdaNet.constant(qnet.feature_dim)
    return QValueModel(qnet.features, qnet.head, group, lambda_net=lambda_net.to(next(qnet.parameters()).device))


@torch.no_grad()
def greedy_actions(model: QValueModel, obs: Tensor, method: str) -> Tensor:
    """``[B, D] -> [B]``: the argmax of the combined Q-values."""
    return model.predict(obs, method).output.argmax(-1)

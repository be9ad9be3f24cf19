"""The ``model.yaml`` of an act entry: a DQN agent of one gymnasium environment.

Example (``models/dqn-cartpole/model.yaml``)::

    task: act
    env: CartPole-v1
    group: z2
    backbone: {family: mlp, options: {hidden: [256, 256]}}
    weights: qnet.safetensors
    methods: [vanilla, equitune, equizero, lambda]
    default_method: lambda
    lambda_net: lambda_net.safetensors   # optional; without it λ is uniform (λ-equitune = equitune)
    training: {...}                       # free-form: how the agent was trained and what it scored
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from app.tasks.base import TaskSpec

from .qnet import DEFAULT_HIDDEN
from .settings import ActLimits
from .symmetries import SYMMETRIES, symmetry

BACKBONE_FAMILY = "mlp"


class ActSpec(TaskSpec):
    limits_type = ActLimits
    task: Literal["act"] = "act"
    env: str = Field(description="gymnasium id of the environment the agent acts in, e.g. CartPole-v1")
    weights: str = Field("qnet.safetensors", description="safetensors file of the Q-network (app.tasks.act.qnet.QNet)")
    training: dict[str, Any] = Field(default_factory=dict, description="how the agent was trained (informative)")

    @model_validator(mode="after")
    def _check(self) -> ActSpec:
        if self.env not in SYMMETRIES:
            raise ValueError(f"unknown environment {self.env!r}; choose from {sorted(SYMMETRIES)}")
        expected = symmetry(self.env).group_name
        if self.group != expected:
            raise ValueError(f"the symmetry group of {self.env} is {expected!r}, not {self.group!r}")
        if self.backbone.family != BACKBONE_FAMILY:
            raise ValueError(f"act entries have an {BACKBONE_FAMILY!r} backbone, not {self.backbone.family!r}")
        unknown = set(self.backbone.options) - {"hidden"}
        if unknown:
            raise ValueError(f"unknown backbone options {sorted(unknown)}; the mlp takes 'hidden'")
        if "zero_loss" in self.model_fields_set:
            raise ValueError("zero_loss does not apply: for Q-values equizero picks the copy with the largest Q-value")
        return self

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(int(h) for h in self.backbone.options.get("hidden", DEFAULT_HIDDEN))

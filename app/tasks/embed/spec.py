"""The ``model.yaml`` of an embed entry: an image backbone, its group and (optionally) a λ-net.

Example::

    task: embed
    backbone: {family: efficientnet_lite, options: {variant: lite0}}
    group: c4
    methods: [vanilla, equitune, lambda]
    default_method: equitune
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from app.equivariance import Method
from app.tasks.classify.spec import ClassifySpec

from .messages import EMBED_METHODS
from .settings import EmbedLimits


class EmbedSpec(ClassifySpec):
    limits_type = EmbedLimits
    task: Literal["embed"] = "embed"  # type: ignore[assignment]
    methods: list[Method] = Field(default_factory=lambda: list(EMBED_METHODS))

    @model_validator(mode="after")
    def _check_embed_methods(self) -> EmbedSpec:
        if Method.EQUIZERO in self.methods:
            raise ValueError("equizero selects a copy by its prediction's loss; embed models have no prediction")
        return self

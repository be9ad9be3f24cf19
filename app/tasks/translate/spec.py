"""The ``model.yaml`` of a translate entry: a SCAN seq2seq model served over a group of word swaps.

Example (``models/scan-gru-addjump/model.yaml``)::

    task: translate
    description: ...
    split: add_jump                      # what it was trained on (informative; the card shows it)
    backbone: {family: seq2seq, options: {cell: gru, hidden: 64, bidirectional: true}}
    weights: seq2seq.safetensors         # app.tasks.translate.seq2seq.Seq2Seq
    group: verb4                         # verb | verb4 | direction, or axes joined by '+'
    methods: [vanilla, equitune, equizero, lambda]
    default_method: equizero
    zero_loss: neg_max_prob              # equizero: highest mean max-probability (or: entropy)
    combine: probs                       # equitune/λ: mix the copies' distributions (or: logits)
    lambda_net: lambda_net.safetensors   # optional; without it λ is uniform (λ-equitune = equitune)
    max_actions: 64                      # decoding limit
    training: {...}                      # free-form: how it was trained and what it scored
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from app.equivariance.text import CombineSpace
from app.tasks.base import TaskSpec

from .groups import parse_group
from .scan import SPLITS
from .seq2seq import CELLS
from .settings import TranslateLimits

BACKBONE_FAMILY = "seq2seq"
BACKBONE_OPTIONS = {"cell", "hidden", "bidirectional"}


class TranslateSpec(TaskSpec):
    limits_type = TranslateLimits
    task: Literal["translate"] = "translate"
    split: Literal["add_jump", "around_right"] | None = Field(None, description=f"the SCAN split trained on: {SPLITS}")
    weights: str = Field("seq2seq.safetensors", description="safetensors file of the seq2seq model")
    combine: CombineSpace = Field(
        CombineSpace.PROBS, description="equitune/λ: mix the copies' next-action distributions, or average log-probs"
    )
    max_actions: int = Field(64, ge=1, le=1024, description="actions decoded at most per command")
    training: dict[str, Any] = Field(default_factory=dict, description="how the model was trained (informative)")

    @model_validator(mode="after")
    def _check(self) -> TranslateSpec:
        try:
            parse_group(self.group)
        except ValueError as exc:
            raise ValueError(str(exc)) from exc
        if self.backbone.family != BACKBONE_FAMILY:
            raise ValueError(f"translate entries have a {BACKBONE_FAMILY!r} backbone, not {self.backbone.family!r}")
        unknown = set(self.backbone.options) - BACKBONE_OPTIONS
        if unknown:
            raise ValueError(
                f"unknown backbone options {sorted(unknown)}; the seq2seq takes {sorted(BACKBONE_OPTIONS)}"
            )
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose from {list(CELLS)}")
        return self

    @property
    def cell(self) -> str:
        return str(self.backbone.options.get("cell", "gru"))

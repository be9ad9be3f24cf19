"""The ``model.yaml`` of a classify entry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from app.backbones.factory import IMAGE_FAMILIES
from app.equivariance.groups import IMAGE_GROUPS
from app.tasks.base import TaskSpec

from .settings import ClassifyLimits


class ClassifySpec(TaskSpec):
    limits_type = ClassifyLimits
    task: Literal["classify"] = "classify"
    head: str | None = Field(None, description="safetensors file of a linear head (weight, bias)")
    labels: list[str] | str | None = Field(None, description="label names, or a text file with one per line")
    precision: Literal["float32", "int8"] | None = Field(
        None, description="backbone precision on the CPU (onnxruntime); None: the server's EQUISERVE_PRECISION"
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description="pin this model's batch cap (at most EQUISERVE_MAX_BATCH_SIZE); the tuner then measures nothing",
    )
    calibration: str = Field(
        "photos",
        description="int8 calibration images: 'photos' (the web examples and scikit-image's photos), "
        "'fashion-mnist' (its training images), or a folder inside the model folder",
    )

    @model_validator(mode="after")
    def _check(self) -> ClassifySpec:
        if self.group not in IMAGE_GROUPS:
            raise ValueError(f"unknown group {self.group!r}; choose from {list(IMAGE_GROUPS)}")
        if self.backbone.family not in IMAGE_FAMILIES:
            raise ValueError(
                f"backbone family {self.backbone.family!r} is no image backbone; choose from {list(IMAGE_FAMILIES)}"
            )
        if self.head is not None and self.labels is None:
            raise ValueError("a head needs its labels")
        return self

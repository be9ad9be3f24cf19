"""The image backbone families and how to build them (the tasks say which families they take)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the families import torch only when one is built
    from .base import ImageBackbone

# What create_backbone builds; other families (causal_lm, a task's own networks) are their task's.
IMAGE_FAMILIES: tuple[str, ...] = ("efficientnet_lite", "torchvision", "open_clip", "onnx")


def create_backbone(family: str, **options: Any) -> ImageBackbone:
    """Build an image backbone; imports are lazy so a deployment only loads what it serves."""
    if family == "efficientnet_lite":
        from .efficientnet import EfficientNetLite

        return EfficientNetLite(**options)
    if family == "torchvision":
        from .torchvision_cnn import TorchvisionClassifier

        return TorchvisionClassifier(**options)
    if family == "open_clip":
        from .open_clip_zero_shot import OpenClipZeroShot

        return OpenClipZeroShot(**options)
    if family == "onnx":
        from .onnx_runtime import OnnxBackbone

        return OnnxBackbone(**options)
    raise ValueError(f"unknown image backbone family {family!r}; choose from {list(IMAGE_FAMILIES)}")


def weights_are_local(family: str, **options: Any) -> bool:
    """Whether building this backbone needs no download (open_clip tags and hub LMs may need one)."""
    if family == "open_clip":
        from .open_clip_zero_shot import pretrained_is_local

        return pretrained_is_local(options.get("model_name", "ViT-B-32"), options.get("pretrained"))
    if family == "causal_lm":
        from .causal_lm import weights_are_local as lm_is_local

        return lm_is_local(**options)
    return True

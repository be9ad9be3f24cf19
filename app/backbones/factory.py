"""One place that turns a backbone family name and its options into a backbone."""

from __future__ import annotations

from typing import Any

from .base import ImageBackbone

FAMILIES = ("efficientnet_lite", "torchvision", "open_clip", "onnx")


def create_backbone(family: str, **options: Any) -> ImageBackbone:
    """Build a backbone; imports are lazy so a deployment only loads what it serves."""
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
    raise ValueError(f"unknown backbone family {family!r}; choose from {FAMILIES}")


def weights_are_local(family: str, **options: Any) -> bool:
    """Whether building this backbone needs no download (only open_clip tags may need one)."""
    if family == "open_clip":
        from .open_clip_zero_shot import pretrained_is_local

        return pretrained_is_local(options.get("model_name", "ViT-B-32"), options.get("pretrained"))
    return True

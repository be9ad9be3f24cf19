"""Label names that ship with the installed packages (nothing is downloaded)."""

from __future__ import annotations

import functools


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in torchvision's (= the usual) class order."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])

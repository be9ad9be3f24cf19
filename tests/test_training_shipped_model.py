"""The shipped models/fashion-effnet-c4 entry: loads as the server loads it, answers rotated
Fashion-MNIST uploads identically, and is accurate on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.backbones.preprocess import pixels_from_uint8
from app.config import DEFAULT_MODELS_DIR
from app.engine.registry import load_model
from app.training.data import FASHION_MNIST_CLASSES, fashion_mnist
from app.training.features import use_fast_cpu_layout

pytestmark = pytest.mark.slow  # real ImageNet weights


def test_fashion_model_is_served_invariant_and_accurate() -> None:
    loaded = load_model(DEFAULT_MODELS_DIR, "fashion-effnet-c4", device="cpu")
    assert loaded.lambda_trained and loaded.spec.group == "c4" and loaded.spec.default_method.value == "lambda"
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

"""Training data is decoded and preprocessed exactly as the server decodes and preprocesses uploads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.backbones.datasets import FASHION_MNIST_CLASSES, fashion_mnist, image_folder, load_splits, load_test
from app.backbones.images import decode_image
from app.backbones.preprocess import pixels_from_uint8
from tests.imagetools import png_bytes


def test_fashion_mnist_files() -> None:
    test = fashion_mnist("test")
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert sorted(set(test.labels.tolist())) == list(range(10)) and test.classes == list(FASHION_MNIST_CLASSES)


def test_training_pixels_equal_serving_pixels() -> None:
    """A Fashion-MNIST image uploaded as a grayscale PNG reaches the model as the same pixels."""
    data = fashion_mnist("test").subset(range(3))
    for i in range(3):
        served = decode_image(png_bytes(data.images[i]), max_pixels=10_000, min_side=64)  # a mode "L" PNG
        assert np.array_equal(served, data.rgb(i))
        assert torch.equal(pixels_from_uint8(served, 64), data.pixels([i], 64)[0])


def test_splits_are_disjoint_seeded_and_from_training_data() -> None:
    a = load_splits("fashion-mnist", train_size=300, val_size=100, test_size=50, seed=3)
    b = load_splits("fashion-mnist", train_size=300, val_size=100, test_size=50, seed=3)
    assert a.train.fingerprint == b.train.fingerprint and a.val.fingerprint == b.val.fingerprint
    assert (len(a.train), len(a.val), len(a.test or [])) == (300, 100, 50)
    train_rows = {row.tobytes() for row in a.train.images}
    assert not any(row.tobytes() in train_rows for row in a.val.images)
    assert load_test("fashion-mnist", test_size=50, seed=3).fingerprint == a.test.fingerprint  # type: ignore[union-attr]
    assert load_splits("fashion-mnist", train_size=300, val_size=100, seed=4).train.fingerprint != a.train.fingerprint


def test_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = image_folder(tmp_path)
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1]
    assert data.rgb(3).shape == (20, 30, 3) and data.pixels([0, 3], 16).shape == (2, 3, 16, 16)

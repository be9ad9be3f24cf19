"""Shared fixtures: real photos from installed packages, small random-init backbones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DARKNET_DATA = Path("/usr/share/darknet/data")


def photo(name: str) -> np.ndarray:
    """A real RGB photo as ``uint8 [H, W, 3]``: scikit-image's samples or darknet's JPEGs."""
    if name in {"coffee", "chelsea", "rocket", "astronaut", "motorcycle"}:
        import skimage.data

        return getattr(skimage.data, name)()
    from PIL import Image

    path = DARKNET_DATA / f"{name}.jpg"
    if not path.exists():
        pytest.fail(f"{path} is missing: install the Debian package `darknet` (.ci/run does)")
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)

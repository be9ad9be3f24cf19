"""Preprocessing commutes with the image groups, so rotated uploads get the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.backbones.preprocess import pixels_from_uint8, resize_center_crop, target_size


@pytest.mark.parametrize(("h", "w"), [(480, 640), (640, 480), (301, 500), (224, 224), (100, 101), (37, 1000)])
def test_target_size_keeps_short_side_and_even_margin(h: int, w: int) -> None:
    th, tw = target_size(h, w, 224)
    assert min(th, tw) == 224
    assert (max(th, tw) - 224) % 2 == 0
    assert abs(max(th, tw) / 224 - max(h, w) / min(h, w)) < 2 / 224 + 1e-9


@pytest.mark.parametrize(("h", "w"), [(61, 90), (90, 61), (64, 64), (45, 120)])
def test_resize_crop_commutes_with_rotations_and_flips(h: int, w: int) -> None:
    image = torch.rand(3, h, w)
    base = resize_center_crop(image, 32)
    assert base.shape == (3, 32, 32)
    for k in range(4):
        rotated = resize_center_crop(torch.rot90(image, k, (-2, -1)), 32)
        torch.testing.assert_close(rotated, torch.rot90(base, k, (-2, -1)), rtol=0, atol=1e-5)
    torch.testing.assert_close(resize_center_crop(image.flip(-1), 32), base.flip(-1), rtol=0, atol=1e-5)


def test_pixels_from_uint8_scales_to_unit_range() -> None:
    array = np.full((10, 20, 3), 255, dtype=np.uint8)
    pixels = pixels_from_uint8(array, 8)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, torch.ones(3, 8, 8))

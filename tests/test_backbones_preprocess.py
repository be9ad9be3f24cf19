"""Preprocessing commutes with the image groups, so rotated uploads get the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.backbones.preprocess import crop_box, pixels_from_uint8, resize_center_crop


@pytest.mark.parametrize(("h", "w"), [(480, 640), (640, 480), (301, 500), (224, 224), (100, 101), (1, 10000)])
def test_crop_box_is_centred_and_symmetric(h: int, w: int) -> None:
    top, left, crop_h, crop_w = crop_box(h, w)
    assert min(crop_h, crop_w) == min(h, w) and abs(crop_h - crop_w) <= 1
    assert h - crop_h - top == top and w - crop_w - left == left  # equal margins


@pytest.mark.parametrize(("h", "w"), [(61, 90), (90, 61), (64, 64), (45, 120), (33, 34), (3, 200)])
def test_resize_crop_commutes_with_rotations_and_flips(h: int, w: int) -> None:
    image = torch.rand(3, h, w)
    base = resize_center_crop(image, 32)
    assert base.shape == (3, 32, 32)
    for k in range(4):
        rotated = resize_center_crop(torch.rot90(image, k, (-2, -1)), 32)
        torch.testing.assert_close(rotated, torch.rot90(base, k, (-2, -1)), rtol=0, atol=1e-5)
    torch.testing.assert_close(resize_center_crop(image.flip(-1), 32), base.flip(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(resize_center_crop(image.flip(-2), 32), base.flip(-2), rtol=0, atol=1e-5)


def test_pixels_from_uint8_scales_to_unit_range_and_keeps_memory_bounded() -> None:
    array = np.full((10, 20, 3), 255, dtype=np.uint8)
    pixels = pixels_from_uint8(array, 8)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, torch.ones(3, 8, 8))
    strip = np.zeros((1, 100_000, 3), dtype=np.uint8)  # a 1-pixel-high strip: crop first, then resize
    assert pixels_from_uint8(strip, 224).shape == (3, 224, 224)


def test_pixels_from_uint8_matches_the_tensor_path() -> None:
    array = np.random.default_rng(0).integers(0, 256, (37, 52, 3), dtype=np.uint8)
    via_numpy = pixels_from_uint8(array, 16)
    via_tensor = resize_center_crop(torch.from_numpy(array).permute(2, 0, 1).float() / 255, 16)
    torch.testing.assert_close(via_numpy, via_tensor, rtol=0, atol=1e-6)

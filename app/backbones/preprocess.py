"""Resize and centre-crop in float, so that preprocessing commutes with the image groups.

Rotating an upload by 90° must give the same pixels as rotating the preprocessed image,
otherwise "rotate the photo, get the same answer" fails before the group ever acts. Two
details make that exact (up to float rounding):

* the resize is an antialiased bilinear interpolation on a float tensor, which treats
  both axes alike and is symmetric under flips (PIL's integer pipeline is not);
* the crop must take as many pixels off one side as off the other. When the resized long
  side minus the short side is odd, no integer crop is centred, so we resize the long side
  to the nearest length with an even difference instead (less than one pixel of stretch).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


def target_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Resized ``(h, w)``: the short side becomes ``size``, ``long - size`` is even."""
    short, long = (height, width) if height <= width else (width, height)
    scaled_long = long * size / short
    new_long = size + 2 * round((scaled_long - size) / 2)
    return (size, new_long) if height <= width else (new_long, size)


def resize_center_crop(image: Tensor, size: int) -> Tensor:
    """``[..., C, H, W]`` float -> ``[..., C, size, size]`` float (resize short side, crop)."""
    height, width = image.shape[-2:]
    new_h, new_w = target_size(height, width, size)
    if (new_h, new_w) != (height, width):
        lead = image.shape[:-3]
        batched = image.reshape(-1, *image.shape[-3:])
        batched = F.interpolate(batched, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        image = batched.reshape(*lead, *batched.shape[-3:])
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[..., top : top + size, left : left + size]


def pixels_from_uint8(array: np.ndarray, size: int) -> Tensor:
    """An ``uint8 [H, W, 3]`` RGB image -> float ``[3, size, size]`` in ``[0, 1]``."""
    tensor = (
        torch.from_numpy(np.require(array, dtype=np.uint8, requirements=["C", "W"]))
        .permute(2, 0, 1)
        .float()
        .div_(255.0)
    )
    return resize_center_crop(tensor, size).contiguous()

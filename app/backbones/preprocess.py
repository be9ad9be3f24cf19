"""Centre-crop and resize, in float, so that preprocessing commutes with the image groups.

Rotating an upload by 90° must give the same pixels as rotating the preprocessed image,
otherwise "rotate the photo, get the same answer" fails before the group ever acts. Three
details make that exact (up to float rounding):

* the crop takes as many pixels off one side as off the other. A centred square crop is
  impossible when ``long - short`` is odd, so we keep one extra row/column of the long side
  then (a ``short x (short + 1)`` region, stretched by less than one pixel in the resize);
* the resize is an antialiased bilinear interpolation on a float tensor, which treats both
  axes alike and is symmetric under flips (PIL's integer pipeline is not);
* cropping comes first, on the uint8 image: memory stays bounded by the upload's pixels
  and a 1x10000 strip does not become a 224x2240000 float tensor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


def crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, left, crop_h, crop_w)`` of the centred, symmetric crop of an ``H x W`` image."""
    short = min(height, width)
    crop_h = short + (height - short) % 2
    crop_w = short + (width - short) % 2
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resize_center_crop(image: Tensor, size: int) -> Tensor:
    """``[..., C, H, W]`` -> ``[..., C, size, size]`` float: centre crop, then resize."""
    top, left, crop_h, crop_w = crop_box(*image.shape[-2:])
    image = image[..., top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) == (size, size):
        return image.float()
    lead = image.shape[:-3]
    batched = image.reshape(-1, *image.shape[-3:]).float()
    batched = F.interpolate(batched, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return batched.reshape(*lead, *batched.shape[-3:])


# Rows of a crop turned into float at a time: the float copy of a whole 25-megapixel crop would
# be four times the decoded image.
STRIP_ROWS = 256


def pixels_from_uint8(array: np.ndarray, size: int) -> Tensor:
    """An ``uint8 [H, W, 3]`` RGB image -> float ``[3, size, size]`` in ``[0, 1]``: the centred
    crop resized as ``resize_center_crop`` does, bit for bit (tested), but without copying the
    crop. The antialiased resize is separable: torch resizes the rows, then the columns; here
    the rows are resized a strip at a time, so only ``[3, h, size]`` floats are ever held."""
    top, left, crop_h, crop_w = crop_box(*array.shape[:2])
    crop = array[top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) == (size, size):
        return torch.from_numpy(np.array(crop, dtype=np.float32)).permute(2, 0, 1).div_(255.0).contiguous()
    # channels-last like the crop itself (``crop_uint8``'s layout), as the one-call resize sees it
    rows = torch.empty(1, crop_h, size, 3).permute(0, 3, 1, 2)
    for start in range(0, crop_h, STRIP_ROWS):
        strip = torch.from_numpy(np.array(crop[start : start + STRIP_ROWS], dtype=np.float32))
        strip = strip.permute(2, 0, 1).unsqueeze(0)
        rows[:, :, start : start + strip.shape[2]] = _resize(strip, (strip.shape[2], size))
    return _resize(rows, (size, size))[0].div_(255.0).contiguous()


def _resize(batch: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)


def crop_uint8(array: np.ndarray) -> Tensor:
    """An ``uint8 [H, W, 3]`` RGB image -> its centred crop as ``uint8 [3, h, w]`` (a copy,
    in the image's layout: the permute is a view), for resizing later, on the device."""
    top, left, crop_h, crop_w = crop_box(*array.shape[:2])
    cropped = np.array(array[top : top + crop_h, left : left + crop_w], dtype=np.uint8, copy=True)
    return torch.from_numpy(cropped).permute(2, 0, 1)


def resize_on_device(images: list[Tensor], size: int, device: torch.device, *, pin: bool = False) -> Tensor:
    """``uint8 [3, h, w]`` images (cropped or not; on the host or the device) -> float
    ``[B, 3, size, size]`` in ``[0, 1]`` on ``device``: ``pixels_from_uint8``'s crop and resize,
    done on the device. uint8 crosses the bus (a quarter of float32's bytes), from pinned memory
    without blocking when ``pin``; images of one shape are resized in one call. On the CPU the
    result is ``pixels_from_uint8``'s, bit for bit (tested)."""
    moved = []
    for image in images:
        if image.device != device:
            image = image.contiguous()
            if pin:
                image = image.pin_memory()
            image = image.to(device, non_blocking=pin)
        moved.append(image)
    out = torch.empty(len(images), 3, size, size, device=device)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(moved):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for rows in by_shape.values():
        batch = torch.stack([moved[i] for i in rows])
        out[torch.tensor(rows, device=device)] = resize_center_crop(batch, size).div_(255.0)
    return out

"""Image bytes -> ``uint8 [H, W, 3]`` RGB arrays, with the limits a public endpoint needs.

The server decodes here (in the engine's preprocessing pool); training and the benchmarks
import the same function, so what they see is what the server sees.

Decisions (documented in docs/configuration.md, "Limits and errors"):
* the pixel limit is checked from the header, before any pixel is decoded (decompression
  bombs never allocate);
* EXIF orientation is applied first: the group then acts on the photo as the camera meant
  it, so an EXIF-rotated JPEG and the same photo rotated in its pixels answer alike;
* animated images use their first frame; alpha is dropped; CMYK, palette, grayscale and
  16-bit images are converted to 8-bit RGB;
* baseline and progressive RGB/grayscale JPEGs (nearly every upload) are decoded by
  libjpeg-turbo through ``simplejpeg`` when it is installed: PIL reads the header (size, EXIF),
  simplejpeg decodes straight into a numpy array at the DCT scale PIL's draft mode would
  choose, so the pixels are PIL's, bit for bit (tested), without PIL's copies. Anything it
  refuses goes to PIL, which then decides.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import TooLarge, UndecodableImage, UnsupportedMediaType

if TYPE_CHECKING:
    import torch

try:  # libjpeg-turbo straight into numpy: optional (pip install simplejpeg); PIL decodes otherwise
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where simplejpeg is missing
    simplejpeg = None

# We enforce our own (configurable) pixel limit before decoding; PIL's global one would
# raise a different error for the same condition.
Image.MAX_IMAGE_PIXELS = None

ACCEPTED_CONTENT_TYPES = ("image/", "application/octet-stream")

# Leading bytes of the formats we read: a file that starts like an image but does not open
# is a broken image (400); anything else is not an image at all (415).
IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
)  # fmt: skip


def looks_like_an_image(data: bytes) -> bool:
    return data.startswith(IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def check_content_type(content_type: str | None) -> None:
    if content_type and not content_type.lower().startswith(ACCEPTED_CONTENT_TYPES):
        raise UnsupportedMediaType(f"content type {content_type!r} is not an image")


def decode_base64(data: str, max_bytes: int) -> bytes:
    if len(data) > max_bytes * 4 // 3 + 4:
        raise TooLarge(f"a base64 image is over {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UndecodableImage(f"invalid base64: {exc}") from exc


def open_image(data: bytes, *, max_pixels: int, content_type: str | None = None) -> Image.Image:
    """Read an image's header (nothing is decoded): its format, size and mode, with the limits checked."""
    check_content_type(content_type)
    if not data:
        raise UndecodableImage("empty image")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        if looks_like_an_image(data):
            raise UndecodableImage("the image data is corrupt or truncated") from exc
        raise UnsupportedMediaType("not an image in a format we read (JPEG, PNG, WebP, GIF, BMP, TIFF)") from exc
    except Exception as exc:
        raise UndecodableImage(f"cannot read the image header: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise TooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width < 1 or height < 1:
        raise UndecodableImage("image has no pixels")
    return image


def is_plain_jpeg(image: Image.Image) -> bool:
    """An RGB (YCbCr) or grayscale JPEG: what libjpeg-turbo and nvJPEG decode to RGB as PIL does."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


def decode_image(data: bytes, *, max_pixels: int, min_side: int = 0, content_type: str | None = None) -> np.ndarray:
    """Decode one image. ``min_side``: JPEGs may be decoded at a reduced scale (DCT scaling)
    as long as both sides stay at least this long — much faster for big photos."""
    image = open_image(data, max_pixels=max_pixels, content_type=content_type)
    fast = _decode_jpeg(data, image, min_side) if is_plain_jpeg(image) else None
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF/ICC data; the image is still fine
            if min_side and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            # In place: otherwise an image without an orientation to apply is copied whole for nothing.
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grayscale: scale to 8 bits instead of clipping to white.
                array = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                gray = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
            return rgb_array(image if image.mode == "RGB" else image.convert("RGB"))  # convert copies even RGB
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UndecodableImage(f"the image data is corrupt or truncated: {exc}") from exc


# Bytes of one band of rows in ``rgb_array``.
BAND_BYTES = 4 * 1024 * 1024


def rgb_array(image: Image.Image) -> np.ndarray:
    """A decoded RGB image's pixels as ``uint8 [H, W, 3]``, copied a band of rows at a time:
    ``np.asarray`` of the whole image goes through ``tobytes``, which holds the pixels twice
    more (its pieces, then their join) beside PIL's own copy while it converts."""
    width, height = image.size
    rows = max(1, BAND_BYTES // (3 * width))
    if rows >= height:  # one band: as cheap as it gets
        return np.asarray(image, dtype=np.uint8)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, rows):
        out[top : top + rows] = np.asarray(image.crop((0, top, width, min(height, top + rows))), dtype=np.uint8)
    return out


# EXIF orientation (tag 0x0112) -> (transpose rows and columns first?, axes to flip then): the
# eight orientations as PIL's ImageOps.exif_transpose applies them (tested against it).
_ORIENTATIONS = {1: (False, ()), 2: (False, (1,)), 3: (False, (0, 1)), 4: (False, (0,)),
                 5: (True, ()), 6: (True, (1,)), 7: (True, (0, 1)), 8: (True, (0,))}  # fmt: skip


def apply_orientation(image: np.ndarray | torch.Tensor, orientation: int, rows: int = 0) -> np.ndarray | torch.Tensor:
    """Turn an image the way its EXIF ``orientation`` says; ``rows``: the axis of rows (0 for
    ``[H, W, C]`` arrays, 1 for ``[C, H, W]`` tensors). numpy arrays come back as views."""
    transpose, flips = _ORIENTATIONS.get(orientation, (False, ()))
    lib: Any = np if isinstance(image, np.ndarray) else importlib.import_module("torch")
    if transpose:
        image = lib.swapaxes(image, rows, rows + 1)
    if flips:
        image = lib.flip(image, tuple(rows + axis for axis in flips))
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1 = as stored) from an opened image's header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(image.getexif().get(0x0112, 1))
    except Exception:  # unreadable EXIF: PIL's exif_transpose would not turn the image either
        return 1


def draft_scale(width: int, height: int, min_side: int) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) PIL's ``draft("RGB", (min_side, min_side))``
    picks: the largest that keeps both sides at least ``min_side``."""
    if min_side <= 0:
        return 1
    scale = min(width // min_side, height // min_side)
    return next((d for d in (8, 4, 2) if scale >= d), 1)


def _decode_jpeg(data: bytes, image: Image.Image, min_side: int) -> np.ndarray | None:
    """An RGB/grayscale JPEG decoded by simplejpeg as PIL would decode it, or None to let PIL do it."""
    if simplejpeg is None:
        return None
    width, height = image.size
    denominator = draft_scale(width, height, min_side)
    # simplejpeg picks the smallest of libjpeg-turbo's n/8 scales that keeps both sides at least
    # this long; PIL's size at 1/d (floored, as simplejpeg compares) pins it to exactly 1/d.
    try:
        array = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=height // denominator, min_width=width // denominator
        )
    except ValueError:  # corrupt, truncated, or a kind simplejpeg refuses: PIL decides
        return None
    orientation = exif_orientation(image)
    return array if orientation == 1 else np.ascontiguousarray(apply_orientation(array, orientation))


def decode_jpegs_on_device(jpegs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG files -> ``uint8 [3, H, W]`` RGB tensors on ``device``, decoded there in one batch
    (nvJPEG on CUDA; libjpeg-turbo on the CPU, equal to PIL's full-size decode). An image the
    batch decoder refuses is tried alone; None where that fails too (the caller decodes it on
    the host, where the error, if any, is the usual one)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded: list[torch.Tensor | None] = []
        for tensor in tensors:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded

"""Image bytes -> ``uint8 [H, W, 3]`` RGB arrays, with the limits a public endpoint needs.

The server decodes here (in the engine's preprocessing pool); training and the benchmarks
import the same function, so what they see is what the server sees.

Decisions (documented in the README, "Limits and errors"):
* the pixel limit is checked from the header, before any pixel is decoded (decompression
  bombs never allocate);
* EXIF orientation is applied first: the group then acts on the photo as the camera meant
  it, so an EXIF-rotated JPEG and the same photo rotated in its pixels answer alike;
* animated images use their first frame; alpha is dropped; CMYK, palette, grayscale and
  16-bit images are converted to 8-bit RGB.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.engine.errors import TooLarge, UndecodableImage, UnsupportedMediaType

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


def decode_image(data: bytes, *, max_pixels: int, min_side: int = 0, content_type: str | None = None) -> np.ndarray:
    """Decode one image. ``min_side``: JPEGs may be decoded at a reduced scale (DCT scaling)
    as long as both sides stay at least this long — much faster for big photos."""
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF/ICC data; the image is still fine
            if min_side and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grayscale: scale to 8 bits instead of clipping to white.
                array = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                gray = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
            rgb = image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UndecodableImage(f"the image data is corrupt or truncated: {exc}") from exc

"""Schemathesis hooks for tests/test_api_schema_fuzz.py (loaded with ``SCHEMATHESIS_HOOKS``).

A schema can say that an image is a base64 string or a file part, never that its bytes decode to
an image: a schema-valid image is random bytes, which the server rightly refuses (400, 415). So
every image of a positive case becomes a real one, drawn from a few small files; how many there
are and every other field stay as generated. Negative cases are left as generated.
"""

from __future__ import annotations

import base64
import io
import itertools
from typing import Any

import numpy as np
import schemathesis
from PIL import Image

IMAGE_ROUTES = ("/classify", "/embed")


def _encoded(size: tuple[int, int], fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


FILES = [
    _encoded(size, fmt, i) for i, (size, fmt) in enumerate([((2, 2), "PNG"), ((40, 24), "JPEG"), ((9, 31), "PNG")])
]


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not case.path.endswith(IMAGE_ROUTES):
        return case
    body = case.body
    files = itertools.cycle(FILES)
    if isinstance(body, dict) and isinstance(body.get("images"), list):  # JSON: {"images": [{"b64": ...}]}
        body["images"] = [
            {**image, "b64": base64.b64encode(next(files)).decode()} if isinstance(image, dict) else image
            for image in body["images"]
        ]
    elif isinstance(body, dict) and isinstance(body.get("image"), list):  # multipart: image parts
        body["image"] = [next(files) for _ in body["image"]]
    return case

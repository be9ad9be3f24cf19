"""A corpus of hostile and odd inputs sent to the running app: each gets its documented status
and JSON error, and the server stays ready throughout."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.apptools import make_settings, serving, set_limits
from tests.imagetools import photo

pytestmark = pytest.mark.adversarial

URL = "/v1/models/tiny/classify"


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def rgb(h: int = 40, w: int = 50, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def corrupt_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]


def gif_animation() -> bytes:
    frames = [rgb(seed=i).convert("P") for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


def tiff_claiming_huge_size() -> bytes:
    # A valid little TIFF whose header says 100000 x 100000: must be refused before decoding.
    data = bytearray(encode(Image.new("L", (8, 8)), "TIFF"))
    image = Image.open(io.BytesIO(bytes(data)))
    assert image.size == (8, 8)
    offset = int.from_bytes(data[4:8], "little")
    count = int.from_bytes(data[offset : offset + 2], "little")
    for i in range(count):
        entry = offset + 2 + 12 * i
        tag = int.from_bytes(data[entry : entry + 2], "little")
        if tag in (256, 257):  # ImageWidth, ImageLength (SHORT or LONG)
            kind = int.from_bytes(data[entry + 2 : entry + 4], "little")
            data[entry + 2 : entry + 4] = (4).to_bytes(2, "little")  # LONG
            data[entry + 8 : entry + 12] = (100_000).to_bytes(4, "little")
            assert kind in (3, 4)
    return bytes(data)


ACCEPTED: dict[str, Callable[[], bytes]] = {
    "1x1": lambda: encode(rgb(1, 1), "PNG"),
    "1x3000 strip": lambda: encode(rgb(1, 3000), "PNG"),
    "3000x2 strip": lambda: encode(rgb(3000, 2), "PNG"),
    "grayscale": lambda: encode(rgb().convert("L"), "PNG"),
    "grayscale+alpha": lambda: encode(rgb().convert("LA"), "PNG"),
    "1-bit": lambda: encode(rgb().convert("1"), "PNG"),
    "palette": lambda: encode(rgb().convert("P"), "PNG"),
    "rgba": lambda: encode(rgb().convert("RGBA"), "PNG"),
    "16-bit grayscale": lambda: encode(
        Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)), "PNG"
    ),
    "cmyk jpeg": lambda: encode(rgb().convert("CMYK"), "JPEG"),
    "progressive jpeg": lambda: encode(rgb(), "JPEG", progressive=True),
    "webp": lambda: encode(rgb(), "WEBP"),
    "animated gif": gif_animation,
    "bmp": lambda: encode(rgb(), "BMP"),
    "tiff": lambda: encode(rgb(), "TIFF"),
}

REFUSED: dict[str, tuple[Callable[[], bytes], str, int]] = {
    "empty file": (lambda: b"", "image/png", 400),
    "truncated jpeg": (lambda: encode(rgb(200, 200), "JPEG")[:600], "image/jpeg", 400),
    "truncated png": (lambda: encode(rgb(200, 200), "PNG")[:300], "image/png", 400),
    "corrupt png": (lambda: corrupt_middle(encode(rgb(200, 200), "PNG")), "image/png", 400),
    "truncated webp": (lambda: encode(rgb(200, 200), "WEBP")[:100], "image/webp", 400),
    "truncated gif": (lambda: encode(rgb(200, 200).convert("P"), "GIF")[:200], "image/gif", 400),
    "png magic only": (lambda: b"\x89PNG\r\n\x1a\n", "image/png", 400),
    "decompression bomb png": (lambda: encode(Image.new("L", (6000, 6000)), "PNG"), "image/png", 413),
    "huge tiff header": (tiff_claiming_huge_size, "image/tiff", 413),
    "text as image/png": (lambda: b"hello, I am not an image", "image/png", 415),
    "html as image/jpeg": (lambda: b"<html><body>hi</body></html>", "image/jpeg", 415),
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml", 415),
    "pdf": (lambda: b"%PDF-1.4\n%...", "application/pdf", 415),
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.imagetools import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root)
    return root


async def test_corpus(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_limits(monkeypatch, "classify", max_pixels=20_000_000)
    settings = make_settings(models_dir, max_body_bytes=2_000_000)
    async with serving(settings) as (client, _):
        for name, make in ACCEPTED.items():
            r = await client.post(URL, files=[("image", ("f", make(), "application/octet-stream"))])
            assert r.status_code == 200, (name, r.text)
        for name, (make, content_type, status) in REFUSED.items():
            r = await client.post(URL, files=[("image", ("f", make(), content_type))])
            assert r.status_code == status, (name, r.status_code, r.text)
            assert r.json()["error"]["message"], name
        # base64: invalid, and over the body limit
        r = await client.post(URL, json={"images": [{"b64": "%%%not-base64%%%"}]})
        assert r.status_code == 400
        r = await client.post(URL, json={"images": [{"b64": "A" * 3_000_000}]})
        assert r.status_code == 413
        # fields
        good = [("image", ("f", ACCEPTED["1x1"](), "image/png"))]
        for data, status in [({"method": "bogus"}, 422), ({"top_k": "-1"}, 422), ({"top_k": "99999"}, 422),
                             ({"top_k": "1e9"}, 422), ({"labels": ["x"] * 5000}, 413),
                             ({"labels": "[" * 100_000 + "]" * 100_000}, 422)]:  # fmt: skip
            r = await client.post(URL, files=good, data=data)
            assert r.status_code == status, (data, r.text)
        r = await client.post("/v1/models/..%2F..%2Fetc/classify", files=good)
        assert r.status_code == 404
        assert (await client.get("/health/ready")).status_code == 200
        assert (await client.post(URL, files=good)).status_code == 200


async def test_exif_orientation_is_applied_before_the_group_acts(models_dir: Path) -> None:
    upright = np.ascontiguousarray(photo("chelsea")[::4, ::4])  # 75 x 113, a real photo
    async with serving(make_settings(models_dir)) as (client, _):

        async def scores(data: bytes, method: str) -> list[float]:
            r = await client.post(URL, files=[("image", ("p.png", data, "image/png"))], data={"method": method})
            assert r.status_code == 200, r.text
            return [p["score"] for p in r.json()["results"][0]["predictions"]]

        reference = await scores(encode(Image.fromarray(upright), "PNG"), "vanilla")
        # Orientation 6: the stored pixels are the photo rotated 90° counter-clockwise;
        # viewers (and we) rotate them back by 90° clockwise.
        stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
        exif = Image.Exif()
        exif[0x0112] = 6
        tagged = encode(stored, "PNG", exif=exif.tobytes())
        # vanilla is not invariant, so equal scores show the EXIF rotation was applied
        assert np.allclose(await scores(tagged, "vanilla"), reference, atol=1e-5)
        untagged = encode(stored, "PNG")
        assert not np.allclose(await scores(untagged, "vanilla"), reference, atol=1e-3)


def test_base64_helper_roundtrip() -> None:
    from app.backbones.images import decode_base64

    assert decode_base64(base64.b64encode(b"abc").decode(), 100) == b"abc"

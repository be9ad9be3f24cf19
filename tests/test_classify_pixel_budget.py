"""Decoded pixels are bounded per request (the sum of its images' headers, 413, before anything is
decoded) and per server (a budget every image model reserves from before decoding, 429 while
spent); reservations come back whichever way an item leaves; big crops do not wait as uint8."""

from __future__ import annotations

import asyncio
import gc
import io
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from app.backbones import images as image_decoding
from app.backbones import preprocess
from app.backbones.preprocess import crop_uint8, pixels_from_uint8, resize_center_crop
from app.engine.engine import Engine
from app.equivariance import Method
from app.errors import DeadlineExceeded, QueueFull, TooLarge, UndecodableImage, UnsupportedMediaType
from app.runtime.pixel_budget import PixelBudget
from app.tasks import load_model
from app.tasks.base import LoadOptions
from app.tasks.classify.messages import ClassifyRequest, EncodedImage
from app.tasks.classify.model import ClassifyModel, ImagePiece
from app.tasks.embed.messages import EmbedRequest
from tests.apptools import make_settings, serving, set_limits
from tests.imagetools import jpeg_bytes, png_bytes, write_tiny_model
from tests.tasktools import write_tiny_embedder


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pixel-budget-models")
    write_tiny_model(root, "tiny")
    write_tiny_embedder(root)
    strict = write_tiny_model(root, "tiny-strict")
    spec = yaml.safe_load((strict / "model.yaml").read_text())
    (strict / "model.yaml").write_text(yaml.safe_dump({**spec, "limits": {"max_request_pixels": 5000}}))
    return root


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many images the image models decoded (one entry per decode)."""
    import app.tasks.classify.model as classify_model

    calls: list[int] = []
    real = classify_model.decode_image

    def counting(*args: Any, **kwargs: Any) -> np.ndarray:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(classify_model, "decode_image", counting)
    return calls


# -- per request ---------------------------------------------------------------------------------


async def test_a_request_over_its_pixel_sum_is_refused_from_the_headers(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, decodes: list[int]
) -> None:
    set_limits(monkeypatch, "classify", max_request_pixels=5000)
    set_limits(monkeypatch, "embed", max_request_pixels=5000)
    pngs = [png_bytes(image(40, 50, seed)) for seed in range(3)]  # 2000 pixels each, each under max_pixels
    async with serving(make_settings(models_dir)) as (client, _):
        for url, name in [
            ("/v1/models/tiny/classify", "EQUISERVE_CLASSIFY_MAX_REQUEST_PIXELS"),
            ("/v1/models/tiny-embed/embed", "EQUISERVE_EMBED_MAX_REQUEST_PIXELS"),
        ]:
            r = await client.post(url, files=files(*pngs))
            assert r.status_code == 413, (url, r.text)
            error = r.json()["error"]
            assert error["code"] == "too_large" and name in error["message"] and "6000" in error["message"]
            assert decodes == [], url  # refused from the headers: no image was decoded
            r = await client.post(url, files=files(*pngs[:2]))  # 4000 pixels
            assert r.status_code == 200, (url, r.text)
            assert len(decodes) == 2
            decodes.clear()


async def test_a_model_yaml_sets_its_own_request_pixel_limit(models_dir: Path, decodes: list[int]) -> None:
    pngs = [png_bytes(image(40, 50, seed)) for seed in range(3)]
    async with serving(make_settings(models_dir)) as (client, _):
        r = await client.post("/v1/models/tiny-strict/classify", files=files(*pngs))
        assert r.status_code == 413 and "5000" in r.json()["error"]["message"] and decodes == []
        assert (await client.post("/v1/models/tiny/classify", files=files(*pngs))).status_code == 200


def test_the_default_lets_sixteen_photos_through_and_not_sixteen_bombs() -> None:
    from app.tasks.classify.settings import ClassifyLimits
    from app.tasks.embed.settings import EmbedLimits

    for limits in (ClassifyLimits(), EmbedLimits()):
        assert 16 * 4032 * 3024 <= limits.max_request_pixels < 16 * limits.max_pixels
        assert limits.max_images == 16


# -- per server ----------------------------------------------------------------------------------


async def test_a_spent_budget_answers_429_then_serves_once_given_back(models_dir: Path) -> None:
    # device pipeline: a 100x100 image waits for its batch as a uint8 crop of 10,000 pixels
    settings = make_settings(models_dir, input_pipeline="device", max_decoded_pixels=15_000, max_wait_ms=5000)
    png = png_bytes(image(100, 100))
    async with serving(settings) as (client, app):
        engine: Engine = app.state.engine
        budget, batcher = engine.decoded_pixels, engine.batchers["tiny"]
        holder = batcher.announce()  # the batch waits for this announced request: the first one stays queued
        first = asyncio.ensure_future(client.post("/v1/models/tiny/classify", files=files(png)))
        while batcher.depth == 0:
            await asyncio.sleep(0.01)
        assert budget.held == 10_000
        metrics = (await client.get("/metrics")).text
        assert "equiserve_decoded_pixels 10000.0" in metrics
        # every image model of the server reserves from the same budget
        for url in ("/v1/models/tiny/classify", "/v1/models/tiny-embed/embed"):
            r = await client.post(url, files=files(png))
            assert r.status_code == 429, (url, r.text)
            assert r.json()["error"]["code"] == "queue_full" and "EQUISERVE_MAX_DECODED_PIXELS" in r.text
            assert int(r.headers["retry-after"]) >= 1
        assert budget.held == 10_000  # a refused request holds nothing
        holder.close()
        assert (await first).status_code == 200
        assert budget.held == 0
        r = await client.post("/v1/models/tiny/classify", files=files(png))
        assert r.status_code == 200 and budget.held == 0
        assert "equiserve_decoded_pixels 0.0" in (await client.get("/metrics")).text
        # a request that could never fit is refused as too large, not asked to retry
        r = await client.post("/v1/models/tiny/classify", files=files(png_bytes(image(130, 130))))
        assert r.status_code == 413 and "EQUISERVE_MAX_DECODED_PIXELS" in r.text
        assert budget.held == 0


@asynccontextmanager
async def running(models_dir: Path, **overrides: Any) -> AsyncIterator[Engine]:
    settings = {"warmup": False, "memory_trim_idle_s": 0, "input_pipeline": "device", **overrides}
    engine = Engine(make_settings(models_dir, **settings))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def settles(budget: PixelBudget, pixels: int = 0) -> bool:
    """Whether the budget comes to hold ``pixels``: items given up are dropped when a pool thread
    or a batch lets go of them, a moment after their request was answered."""
    for _ in range(500):
        if budget.held == pixels:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_reservations_come_back_however_an_item_leaves(models_dir: Path) -> None:
    good = png_bytes(image(100, 100))
    truncated = png_bytes(image(200, 200))[:300]  # its header reads, its pixels do not
    async with running(models_dir, max_wait_ms=5000, request_timeout_s=2) as engine:
        budget, batcher = engine.decoded_pixels, engine.batchers["tiny"]

        def request(*images: bytes) -> ClassifyRequest:
            return ClassifyRequest([EncodedImage(data) for data in images])

        await engine.infer("tiny", "classify", request(good, good))  # answered
        assert budget.held == 0
        await engine.infer("tiny-embed", "embed", EmbedRequest([EncodedImage(good)]))
        assert budget.held == 0

        with pytest.raises(UndecodableImage):  # one image does not decode: the request fails
            await engine.infer("tiny", "classify", request(good, truncated, good))
        assert await settles(budget)
        with pytest.raises(UnsupportedMediaType):  # refused from its header, with the others
            await engine.infer("tiny", "classify", request(good, b"not an image"))
        assert budget.held == 0

        # the caller left while its item was queued: the item is dropped, never run
        holder = batcher.announce()
        waiting = asyncio.ensure_future(engine.infer("tiny", "classify", request(good)))
        while batcher.depth == 0:
            await asyncio.sleep(0.01)
        assert budget.held == 10_000  # the crop is still held, waiting
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        del waiting  # a server lets go of a finished request's task; the task holds its frames
        holder.close()
        assert await settles(budget)
        assert batcher.stats.cancelled == 1

        # the deadline passed while queued (the batch waits for a request that never comes)
        holder = batcher.announce()
        with pytest.raises(DeadlineExceeded):
            await engine.infer("tiny", "classify", request(good))
        assert await settles(budget)
        holder.close()
        assert batcher.stats.expired == 1 and batcher.stats.items == 2


def test_the_budget_reserves_all_or_none_and_cannot_leak() -> None:
    changes: list[int] = []
    budget = PixelBudget(100, on_change=changes.append)
    (first,) = budget.reserve([60])
    with pytest.raises(QueueFull, match="EQUISERVE_MAX_DECODED_PIXELS") as refused:
        budget.reserve([30, 20])  # 110 > 100: none of them
    assert refused.value.retry_after_s >= 1
    assert budget.held == 60
    with pytest.raises(TooLarge):
        budget.reserve([101])
    second, third = budget.reserve([25, 15])
    assert budget.held == 100
    second.shrink(5)
    second.shrink(50)  # never grows back
    assert second.pixels == 5 and budget.held == 80
    third.release()
    third.release()
    assert budget.held == 65
    del first, second  # dropped without a release: given back when collected
    assert budget.held == 0
    assert changes[-1] == 0

    class Cycle:
        pass

    cycle = Cycle()
    cycle.me = cycle  # type: ignore[attr-defined]
    cycle.reservation = budget.reserve([40])[0]  # type: ignore[attr-defined]
    del cycle
    gc.collect()  # the collector finalises it; the budget counts it on its next use
    assert budget.held == 0


# -- what decoding holds -------------------------------------------------------------------------


def served(models_dir: Path, pipeline: str) -> ClassifyModel:
    model = load_model(models_dir, "tiny", options=LoadOptions(device="cpu", input_pipeline=pipeline))
    assert isinstance(model, ClassifyModel)
    return model


def reserved(model: ClassifyModel, data: bytes) -> int:
    return model.request_pixels([EncodedImage(data)]).take(0).pixels


def test_a_reservation_is_what_the_decode_holds_on_the_host(models_dir: Path) -> None:
    photo = jpeg_bytes(image(800, 1000))
    host, device_decode = served(models_dir, "host"), served(models_dir, "device-decode")
    assert reserved(host, photo) == 100 * 125  # decoded at 1/8 scale (DCT scaling)
    assert reserved(device_decode, photo) == 0  # the device decodes it
    assert reserved(host, png_bytes(image(80, 100))) == reserved(device_decode, png_bytes(image(80, 100))) == 8000


def test_device_pipelines_resize_big_crops_on_the_host(models_dir: Path) -> None:
    big, small = png_bytes(image(300, 400, 1)), png_bytes(image(100, 100, 2))
    host, device = served(models_dir, "host"), served(models_dir, "device")
    pieces = [ImagePiece(EncodedImage(data), Method.LAMBDA, 3, None, 10**6, True) for data in (big, small)]
    items = [device.prepare(piece) for piece in pieces]
    # 300x300 crop, 90,000 pixels: resized here rather than held; 10,000 pixels: held for the device
    assert items[0].pixels.dtype == torch.float32 and tuple(items[0].pixels.shape) == (3, 32, 32)
    assert items[1].pixels.dtype == torch.uint8 and tuple(items[1].pixels.shape) == (3, 100, 100)
    assert [item.reservation.pixels for item in items if item.reservation] == [32 * 32, 100 * 100]
    answers = device(items)
    assert all(item.reservation is not None and item.reservation.pixels == 0 for item in items)
    for a, b in zip(host([host.prepare(piece) for piece in pieces]), answers, strict=True):
        assert not isinstance(a, BaseException) and not isinstance(b, BaseException)
        np.testing.assert_array_equal(a.probabilities, b.probabilities)  # the same pixels, the same floats


def test_resizing_never_holds_the_crop_as_float(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real: Callable[..., torch.Tensor] = preprocess.F.interpolate

    def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(preprocess.F, "interpolate", recording)
    for h, w, size in [(1300, 1000, 224), (700, 701, 32), (2, 3000, 32), (3000, 2, 32), (20, 30, 224)]:
        array = image(h, w, h)
        expected = resize_center_crop(crop_uint8(array), size).div_(255.0)
        seen.clear()
        got = pixels_from_uint8(array, size)
        assert torch.equal(got, expected), (h, w, size)  # bit for bit the one-call resize
        _, _, crop_h, crop_w = preprocess.crop_box(h, w)
        # a strip of rows, or the crop's rows already resized: never the crop itself as float
        assert max(seen) <= 3 * max(preprocess.STRIP_ROWS * crop_w, crop_h * size), (h, w, max(seen))
        if (h, w) == (1300, 1000):
            assert max(seen) <= 3 * crop_h * crop_w // 3


def test_decoding_a_big_png_holds_one_copy_of_its_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    array = np.zeros((600, 800, 3), np.uint8)
    array[::7, ::5] = 200  # compresses well: the file is small beside its pixels
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    monkeypatch.setattr(image_decoding, "BAND_BYTES", 64 * 1024)
    tracemalloc.start()
    try:
        decoded = image_decoding.decode_image(buffer.getvalue(), max_pixels=10**6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(decoded, array)
    # numpy's view of the whole image would be two more copies (tobytes' pieces, then their join)
    assert peak < 1.5 * array.nbytes

"""Every error status of the contract, with its JSON body; bad requests never hurt good ones."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.server import create_app
from tests.apptools import make_settings, serving, set_limits
from tests.imagetools import png_bytes

URL = "/v1/models/tiny/classify"


def image_file(seed: int = 0, name: str = "a.png", content_type: str = "image/png") -> tuple:
    array = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    return ("image", (name, png_bytes(array), content_type))


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


async def test_client_errors(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_limits(monkeypatch, "classify", max_images=2, max_pixels=100_000)
    settings = make_settings(tiny_models_dir, max_body_bytes=200_000)
    async with serving(settings) as (client, _):
        good = [image_file()]
        # 400: corrupt and truncated images, invalid base64
        truncated = png_bytes(np.zeros((64, 64, 3), np.uint8))[:60]
        assert_error(await client.post(URL, files=[("image", ("t.png", truncated, "image/png"))]), 400)
        assert_error(await client.post(URL, json={"images": [{"b64": "not base64!!"}]}), 400, "undecodable_image")
        # 404: unknown model, unknown route
        assert_error(await client.post("/v1/models/nope/classify", files=good), 404, "model_not_found")
        assert_error(await client.get("/v1/nothing"), 404)
        # 413: too many images, too many pixels (a decompression bomb), a body over the limit
        three = [image_file(i) for i in range(3)]
        assert_error(await client.post(URL, files=three), 413, "too_large")
        bomb = io.BytesIO()
        Image.new("L", (4000, 4000)).save(bomb, format="PNG")  # 16 Mpx in ~16 kB
        assert len(bomb.getvalue()) < 100_000
        error = assert_error(await client.post(URL, files=[("image", ("b.png", bomb.getvalue(), "image/png"))]), 413)
        assert "pixels" in error["message"]
        big = [("image", ("big.png", b"\0" * 300_000, "image/png"))]
        assert_error(await client.post(URL, files=big), 413, "too_large")
        # 415: not an image (declared type, or bytes no image reader knows), or a wrong body type
        assert_error(await client.post(URL, files=[("image", ("a.txt", b"hello", "text/plain"))]), 415)
        assert_error(await client.post(URL, files=[("image", ("a.png", b"hello world", "image/png"))]), 415)
        assert_error(await client.post(URL, content=b"x", headers={"content-type": "text/plain"}), 415)
        empty = assert_error(await client.post(URL), 415, "unsupported_media_type")  # no body, no content type
        assert "Content-Type" in empty["message"]
        # 422: method, top_k, labels on a fixed-label model, schema
        assert_error(await client.post(URL, files=good, data={"method": "magic"}), 422, "invalid_input")
        assert_error(await client.post(URL, files=good, data={"top_k": "0"}), 422)
        assert_error(await client.post(URL, files=good, data={"top_k": "4"}), 422)  # 3 labels
        assert_error(await client.post(URL, files=good, data={"top_k": "two"}), 422)
        assert_error(await client.post(URL, files=good, data={"labels": ["a", "b"]}), 422)
        assert_error(await client.post(URL, json={"images": []}), 422)
        assert_error(await client.post(URL, json={"images": [{"b64": "AAAA"}], "extra": 1}), 422)
        assert_error(await client.post(URL, content=b"{not json", headers={"content-type": "application/json"}), 422)
        no_image = [("picture", ("a.png", image_file()[1][1], "image/png"))]
        assert_error(await client.post(URL, files=no_image, data={"method": "lambda"}), 422)  # no 'image' field
        assert_error(await client.post(URL, data={"method": "lambda"}), 415)  # a url-encoded form has no files
        # ... and after all that, the server still answers
        assert (await client.get("/health/ready")).status_code == 200
        assert (await client.post(URL, files=good)).status_code == 200


async def test_bad_requests_never_fail_good_ones_in_the_same_batch(tiny_models_dir: Path) -> None:
    async with serving(make_settings(tiny_models_dir, max_wait_ms=100)) as (client, _):
        corrupt = [("image", ("c.png", png_bytes(np.zeros((8, 8, 3), np.uint8))[:40], "image/png"))]
        requests = []
        for i in range(8):
            if i % 2:
                requests.append(client.post(URL, files=corrupt))
            else:
                method = ["lambda", "equizero"][i % 4 // 2]
                requests.append(client.post(URL, files=[image_file(i)], data={"method": method}))
        responses = await asyncio.gather(*requests)
        assert [r.status_code for r in responses] == [200, 400] * 4


async def test_queue_full_gives_429_and_every_accepted_request_is_answered(tiny_models_dir: Path) -> None:
    settings = make_settings(tiny_models_dir, max_batch_size=1, max_wait_ms=0, queue_size=2)
    async with serving(settings) as (client, _):
        payload = {"images": [{"b64": base64.b64encode(image_file(i)[1][1]).decode()} for i in range(1)]}
        responses = await asyncio.gather(*(client.post(URL, json=payload) for _ in range(24)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2
        for r in responses:
            if r.status_code == 429:
                assert_error(r, 429, "queue_full")
                assert int(r.headers["retry-after"]) >= 1
            else:
                assert len(r.json()["results"]) == 1
        metrics = (await client.get("/metrics")).text
        assert 'equiserve_rejected_requests_total{model="tiny",reason="queue_full"}' in metrics


async def test_deadline_in_the_queue_gives_504(tiny_models_dir: Path) -> None:
    settings = make_settings(tiny_models_dir, max_wait_ms=300, request_timeout_s=0.05)
    async with serving(settings) as (client, app):
        # another request on its way keeps the batch waiting 300 ms, past the 50 ms deadline
        arrival = app.state.engine.batchers["tiny"].announce()
        assert_error(await client.post(URL, files=[image_file()]), 504, "deadline_exceeded")
        arrival.close()
        assert (await client.get("/health/ready")).status_code == 200


async def test_the_deadline_runs_from_arrival_not_from_queueing(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Time spent decoding and preprocessing counts: a request is answered within
    ``request_timeout_s`` of its arrival, whatever it waited for before its queue."""
    from app.tasks.classify.model import ClassifyModel

    real = ClassifyModel.preprocess

    def slow_preprocess(self: ClassifyModel, image: np.ndarray) -> object:
        time.sleep(0.6)
        return real(self, image)

    monkeypatch.setattr(ClassifyModel, "preprocess", slow_preprocess)
    settings = make_settings(tiny_models_dir, max_wait_ms=5000, request_timeout_s=1.0)
    async with serving(settings) as (client, app):
        arrival = app.state.engine.batchers["tiny"].announce()  # keeps the batch waiting up to 5 s
        t0 = time.perf_counter()
        assert_error(await client.post(URL, files=[image_file()]), 504, "deadline_exceeded")
        assert time.perf_counter() - t0 < 1.45  # 1 s after arrival; from queueing it would be 1.6 s
        arrival.close()
    settings = make_settings(tiny_models_dir, request_timeout_s=0.3)
    async with serving(settings) as (client, app):  # the whole deadline spent before queueing
        body = assert_error(await client.post(URL, files=[image_file()]), 504, "deadline_exceeded")
        assert "before it could be queued" in body["message"]
        assert app.state.engine.batchers["tiny"].stats.items == 0  # never reached the model


async def test_503_before_ready_and_while_draining(tiny_models_dir: Path) -> None:
    app = create_app(make_settings(tiny_models_dir))
    transport = httpx.ASGITransport(app=app)  # no lifespan: models never loaded
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/health/live")).status_code == 200
        r = await client.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert_error(await client.post(URL, files=[image_file()]), 503, "not_ready")
    async with serving(make_settings(tiny_models_dir)) as (client, app):
        assert (await client.get("/health/ready")).status_code == 200
        app.state.engine.begin_drain()
        r = await client.get("/v2/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        assert_error(await client.post(URL, files=[image_file()]), 503, "not_ready")


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/octet-stream", None])
async def test_png_with_any_image_type_is_read_by_its_content(tiny_models_dir: Path, content_type: str | None) -> None:
    async with serving(make_settings(tiny_models_dir)) as (client, _):
        name, data, _ = image_file()[1]
        file = (name, data, content_type) if content_type else (name, data)
        r = await client.post(URL, files=[("image", file)])
        assert r.status_code == 200, r.text


def test_one_error_repeated_over_a_list_is_one_message() -> None:
    """A flat list where a list of lists belongs: one entry naming the positions, not one per item."""
    from pydantic import TypeAdapter, ValidationError

    from app.tasks.http import validation_message

    try:
        TypeAdapter(dict[str, list[list[float]]]).validate_python({"observations": [0.1] * 20})
    except ValidationError as exc:
        message = validation_message(exc.errors())
    assert message == (
        "observations.*: Input should be a valid list (at [0], [1], [2], [3], [4], [5], [6], [7], ... (20 in all))"
    )
    try:
        TypeAdapter(dict[str, list[list[float]]]).validate_python({"observations": [[1, "a"], [2, 3]], "x": 1})
    except ValidationError as exc:
        message = validation_message(exc.errors())
    # different errors stay apart, each at its own place
    assert message == (
        "observations.0.1: Input should be a valid number, unable to parse string as a number; "
        "x: Input should be a valid list"
    )

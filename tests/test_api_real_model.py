"""The default served model (real EfficientNet-Lite0, c4) on real photos, through HTTP."""

from __future__ import annotations

import numpy as np
import pytest

from app.config import DEFAULT_MODELS_DIR
from tests.apptools import make_settings, serving
from tests.imagetools import jpeg_bytes, photo, png_bytes

pytestmark = pytest.mark.slow
URL = "/v1/models/imagenet-effnet-c4/classify"


@pytest.mark.parametrize(
    ("name", "runtime", "served_by"),
    [("chelsea", "auto", "onnxruntime"), ("rocket", "torch", "torch")],  # auto = the default serve
)
async def test_rotated_photos_get_the_same_answer(name: str, runtime: str, served_by: str) -> None:
    settings = make_settings(DEFAULT_MODELS_DIR, models=["imagenet-effnet-c4"], max_batch_size=4, runtime=runtime)
    array = photo(name)
    async with serving(settings) as (client, _):
        (card,) = (await client.get("/v1/models")).json()["models"]
        assert card["runtime"] == served_by
        for method in ("equitune", "lambda"):
            answers = []
            for k in range(4):
                data = png_bytes(np.ascontiguousarray(np.rot90(array, k)))
                r = await client.post(URL, files=[("image", ("p.png", data, "image/png"))],
                                      data={"method": method, "top_k": "5"})  # fmt: skip
                assert r.status_code == 200, r.text
                answers.append(r.json()["results"][0]["predictions"])
            top = answers[0][0]
            for other in answers[1:]:
                assert other[0]["label"] == top["label"]
                assert abs(other[0]["score"] - top["score"]) < 1e-3
                assert np.allclose([p["score"] for p in other], [p["score"] for p in answers[0]], atol=1e-3)
            # the same photo as a JPEG (lossy) still gets the same top label
            r = await client.post(URL, files=[("image", ("p.jpg", jpeg_bytes(array), "image/jpeg"))],
                                  data={"method": method})  # fmt: skip
            assert r.json()["results"][0]["predictions"][0]["label"] == top["label"]
        if name == "chelsea":
            assert top["label"] in {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}

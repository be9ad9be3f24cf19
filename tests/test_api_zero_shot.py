"""Zero-shot (CLIP) classification over HTTP: label sets per request, mixed in one batch."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import numpy as np
import pytest

from tests.apptools import make_settings, serving, set_limits
from tests.imagetools import png_bytes, write_tiny_clip

URL = "/v1/models/tinyclip/classify"


def image(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8))


@pytest.fixture
def clip_dir(tmp_path: Path) -> Path:
    write_tiny_clip(tmp_path)
    return tmp_path


async def test_labels_as_repeated_field_json_list_and_json_body(clip_dir: Path) -> None:
    labels = ["a cat", "a dog", "an espresso"]
    async with serving(make_settings(clip_dir)) as (client, _):
        card = (await client.get("/v1/models")).json()["models"][0]
        assert card["zero_shot"] is True and card["num_labels"] is None and card["default_method"] == "equizero"
        files = [("image", ("a.png", image(0), "image/png"))]
        repeated = await client.post(URL, files=files, data={"labels": labels, "top_k": "3"})
        as_json = await client.post(URL, files=files, data={"labels": json.dumps(labels), "top_k": "3"})
        body = await client.post(URL, json={"images": [{"b64": base64.b64encode(image(0)).decode()}],
                                            "labels": labels, "top_k": 3})  # fmt: skip
        answers = [r.json()["results"] for r in (repeated, as_json, body)]
        assert all(r.status_code == 200 for r in (repeated, as_json, body))
        assert answers[0] == answers[1] == answers[2]
        predictions = answers[0][0]["predictions"]
        assert sorted(p["label"] for p in predictions) == sorted(labels)
        assert [labels[p["index"]] for p in predictions] == [p["label"] for p in predictions]
        assert answers[0][0]["selected_transform"] in ["identity", "rot90", "rot180", "rot270"]


async def test_different_label_sets_and_methods_in_one_batch(clip_dir: Path) -> None:
    label_sets = [["cat", "dog"], ["car", "bus", "bike"], ["cat", "dog"], ["tree", "flower", "grass", "sky"]]
    methods = ["equizero", "lambda", "equitune", "vanilla"]
    async with serving(make_settings(clip_dir, max_wait_ms=150)) as (client, _):

        async def ask(i: int) -> dict:
            r = await client.post(URL, files=[("image", ("x.png", image(i), "image/png"))],
                                  data={"labels": label_sets[i], "method": methods[i]})  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()

        alone = [await ask(i) for i in range(4)]
        together = await asyncio.gather(*(ask(i) for i in range(4)))
        assert max(t["timing"]["batch_size"] for t in together) > 1
        for i in range(4):
            got, want = together[i]["results"][0], alone[i]["results"][0]
            assert {p["label"] for p in got["predictions"]} == set(label_sets[i])
            assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
            assert np.allclose([p["score"] for p in got["predictions"]], [p["score"] for p in want["predictions"]],
                               atol=1e-4)  # fmt: skip
            assert all(t["top_label"] in label_sets[i] for t in got["transforms"])


async def test_rotated_upload_same_zero_shot_answer(clip_dir: Path) -> None:
    array = np.random.default_rng(5).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    labels = ["one", "two", "three", "four"]
    async with serving(make_settings(clip_dir)) as (client, _):
        scores = []
        for k in range(4):
            data = png_bytes(np.ascontiguousarray(np.rot90(array, k)))
            r = await client.post(URL, files=[("image", ("r.png", data, "image/png"))],
                                  data={"labels": labels, "method": "equizero", "top_k": "4"})  # fmt: skip
            predictions = r.json()["results"][0]["predictions"]
            scores.append({p["label"]: p["score"] for p in predictions})
        for other in scores[1:]:
            assert all(abs(other[label] - scores[0][label]) < 1e-3 for label in labels)


async def test_label_limits_and_errors(clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_limits(monkeypatch, "classify", max_labels=4, max_label_chars=20)
    files = [("image", ("a.png", image(1), "image/png"))]
    async with serving(make_settings(clip_dir)) as (client, _):
        r = await client.post(URL, files=files)
        assert r.status_code == 422 and "labels" in r.json()["error"]["message"]  # no default labels
        assert (await client.post(URL, files=files, data={"labels": list("abcde")})).status_code == 413
        assert (await client.post(URL, files=files, data={"labels": ["a", " "]})).status_code == 422
        assert (await client.post(URL, files=files, data={"labels": ["a", "a"]})).status_code == 422
        assert (await client.post(URL, files=files, data={"labels": ["a", "x" * 21]})).status_code == 422
        assert (await client.post(URL, files=files, data={"labels": "[1, 2]"})).status_code == 422
        assert (await client.post(URL, files=files, data={"labels": ["a", "b"], "top_k": "3"})).status_code == 422
        odd = ["ünïcödé ☕", "猫", "emoji 🐱"]
        r = await client.post(URL, files=files, data={"labels": odd})
        assert r.status_code == 200 and {p["label"] for p in r.json()["results"][0]["predictions"]} == set(odd)

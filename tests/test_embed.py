"""Task ``embed``: invariant image embeddings over the HTTP contract (v1 and v2), on a tiny
resnet18 with a random (\"trained\") λ-net and a tiny CLIP, and on the shipped EfficientNet-Lite0."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from app.config import DEFAULT_MODELS_DIR
from app.tasks.embed.spec import EmbedSpec
from tests.apptools import make_settings, serving, set_limits
from tests.imagetools import photo, png_bytes, write_tiny_clip, write_tiny_model


def as_embed(folder: Path, **changes: object) -> Path:
    """Turn a tiny classify entry into an embed entry of the same backbone (and λ-net)."""
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    spec.update({"task": "embed", "methods": ["vanilla", "equitune", "lambda"], "default_method": "lambda"})
    spec.pop("zero_loss", None)
    spec.update(changes)
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embed-models")
    as_embed(write_tiny_model(root, "tiny-embed"))
    as_embed(write_tiny_clip(root, "clip-embed"))
    return root


def cat(size: int = 3) -> np.ndarray:
    return np.ascontiguousarray(photo("chelsea")[::size, ::size])  # 100 x 151, a real photo


def rotations(image: np.ndarray) -> list[bytes]:
    return [png_bytes(np.ascontiguousarray(np.rot90(image, k))) for k in range(4)]


async def embed(client, name: str, files: list[bytes], method: str) -> dict:  # type: ignore[no-untyped-def]
    r = await client.post(
        f"/v1/models/{name}/embed", files=[("image", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)],
        data={"method": method},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("name", ["tiny-embed", "clip-embed"])
async def test_rotated_photos_get_the_same_embedding(models_dir: Path, name: str) -> None:
    async with serving(make_settings(models_dir)) as (client, _):
        card = next(c for c in (await client.get("/v1/models")).json()["models"] if c["name"] == name)
        assert card["task"] == "embed" and card["methods"] == ["vanilla", "equitune", "lambda"]
        for method in ("equitune", "lambda", "vanilla"):
            body = await embed(client, name, rotations(cat()), method)
            assert body["method"] == method and body["group"] == "c4" and body["dim"] == card["embedding_dim"]
            vectors = np.array([r["embedding"] for r in body["results"]])
            assert vectors.shape == (4, card["embedding_dim"])
            assert np.linalg.norm(vectors, axis=1) == pytest.approx(1.0, abs=1e-5)
            spread = np.abs(vectors - vectors[0]).max()
            if method == "vanilla":  # the plain backbone is not invariant: the check can fail
                assert spread > 1e-3
            else:
                assert spread < 1e-5, (method, spread)
            weights = [[t["lambda"] for t in r["transforms"]] for r in body["results"]]
            assert np.sum(weights, axis=1) == pytest.approx(1.0)
            names = [t["name"] for t in body["results"][0]["transforms"]]
            assert names == ["identity", "rot90", "rot180", "rot270"]
            if method == "lambda" and name == "tiny-embed":  # a trained λ-net: the weights permute with the copies
                assert max(weights[0]) - min(weights[0]) > 1e-4
                assert sorted(weights[1]) == pytest.approx(sorted(weights[0]), abs=1e-6)


async def test_different_photos_are_told_apart(models_dir: Path) -> None:
    async with serving(make_settings(models_dir)) as (client, _):
        body = await embed(client, "tiny-embed", [png_bytes(cat()), png_bytes(photo("astronaut")[::4, ::4].copy())],
                           "lambda")  # fmt: skip
        a, b = (np.array(r["embedding"]) for r in body["results"])
        assert float(a @ b) < 0.99


async def test_v2_embedding_output_equals_v1(models_dir: Path) -> None:
    files = rotations(cat())[:2]
    async with serving(make_settings(models_dir)) as (client, _):
        v1 = await embed(client, "tiny-embed", files, "lambda")
        meta = (await client.get("/v2/models/tiny-embed")).json()
        outputs = {o["name"]: o for o in meta["outputs"]}
        assert outputs["embedding"] == {"name": "embedding", "datatype": "FP32", "shape": [-1, 512]}
        request = {
            "parameters": {"method": "lambda"},
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(f).decode() for f in files]}],
            "outputs": [{"name": "embedding"}, {"name": "lambda"}],
        }  # fmt: skip
        r = await client.post("/v2/models/tiny-embed/infer", json=request)
        assert r.status_code == 200, r.text
        got = {o["name"]: o for o in r.json()["outputs"]}
        embedding = np.array(got["embedding"]["data"]).reshape(got["embedding"]["shape"])
        assert embedding == pytest.approx(np.array([r["embedding"] for r in v1["results"]]), abs=1e-6)
        assert got["lambda"]["shape"] == [2, 4]


async def test_json_body_limits_and_errors(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_limits(monkeypatch, "embed", max_images=2)
    async with serving(make_settings(models_dir)) as (client, _):
        image = {"b64": base64.b64encode(png_bytes(cat())).decode()}
        r = await client.post("/v1/models/tiny-embed/embed", json={"images": [image]})
        assert r.status_code == 200 and r.json()["method"] == "lambda"  # the model's default
        for body, status, words in [
            ({"images": [image] * 3}, 413, "EQUISERVE_EMBED_MAX_IMAGES"),
            ({"images": [image], "method": "equizero"}, 422, "not served"),
            ({"images": []}, 422, "images"),
            ({"images": [image], "top_k": 3}, 422, "top_k"),
        ]:
            r = await client.post("/v1/models/tiny-embed/embed", json=body)
            assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
        r = await client.post("/v1/models/tiny-embed/embed", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 422 and "not valid JSON: EOF while parsing" in r.json()["error"]["message"]
        r = await client.post("/v1/models/tiny-embed/classify", json={"images": [image]})
        assert r.status_code == 404 and "serves task 'embed'" in r.json()["error"]["message"]


def test_equizero_is_refused_in_the_spec() -> None:
    raw = {"name": "x", "task": "embed", "backbone": {"family": "torchvision"}, "group": "c4",
           "methods": ["equitune", "equizero"]}  # fmt: skip
    with pytest.raises(ValidationError, match="no prediction"):
        EmbedSpec.model_validate(raw)


@pytest.mark.slow
async def test_the_shipped_embedder_is_rotation_invariant() -> None:
    settings = make_settings(DEFAULT_MODELS_DIR, models=["imagenet-effnet-c4-embed"], runtime="auto")
    async with serving(settings) as (client, _):
        body = await embed(client, "imagenet-effnet-c4-embed", rotations(cat(2)), "equitune")
        vectors = np.array([r["embedding"] for r in body["results"]])
        assert body["dim"] == 1280 and np.abs(vectors - vectors[0]).max() < 1e-4
        other = await embed(client, "imagenet-effnet-c4-embed", [png_bytes(photo("coffee")[::2, ::2].copy())],
                            "equitune")  # fmt: skip
        assert float(vectors[0] @ np.array(other["results"][0]["embedding"])) < 0.99

"""The classify route end to end on a tiny model: both body forms, methods, diagnostics,
invariance through HTTP, batching across concurrent requests, and metrics."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.apptools import make_settings, serving
from tests.imagetools import TINY_LABELS, png_bytes

URL = "/v1/models/tiny/classify"


def random_image(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_health_models_and_multipart_classify(tiny_models_dir: Path) -> None:
    async with serving(make_settings(tiny_models_dir)) as (client, _):
        for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"):
            r = await client.get(path)
            assert r.status_code == 200 and r.json()["status"] == "ok", path
        models = (await client.get("/v1/models")).json()["models"]
        assert models == [
            {
                "name": "tiny",
                "task": "classify",
                "backbone": "resnet18",
                "group": "c4",
                "transforms": ["identity", "rot90", "rot180", "rot270"],
                "methods": ["vanilla", "equitune", "equizero", "lambda"],
                "default_method": "equitune",
                "num_labels": 3,
                "zero_shot": False,
                "lambda_trained": True,
                "device": "cpu",
                "dtype": "float32",
                "runtime": "torch",
                "input_size": 32,
                "description": "test model",
            }
        ]
        files = [("image", ("a.png", png_bytes(random_image(1)), "image/png"))]
        r = await client.post(URL, files=files, data={"method": "lambda", "top_k": "2"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny" and body["method"] == "lambda" and body["group"] == "c4"
        assert r.headers["x-request-id"]
        (result,) = body["results"]
        assert len(result["predictions"]) == 2
        assert {p["label"] for p in result["predictions"]} <= set(TINY_LABELS)
        assert result["predictions"][0]["score"] >= result["predictions"][1]["score"]
        names = [t["name"] for t in result["transforms"]]
        assert names == ["identity", "rot90", "rot180", "rot270"]
        lambdas = [t["lambda"] for t in result["transforms"]]
        assert sum(lambdas) == pytest.approx(1.0, abs=1e-5)
        assert len(set(round(v, 6) for v in lambdas)) > 1  # a trained (random) λ-net is not uniform
        assert all(t["top_label"] in TINY_LABELS and 0 < t["top_score"] <= 1 for t in result["transforms"])
        assert result["selected_transform"] is None
        # lambda: the weights used are the λ-net's, so the two entropies agree
        assert 0 <= result["lambda_net_entropy"] <= np.log(4) + 1e-6
        used = -sum(w * np.log(w) for w in lambdas if w > 0)
        assert result["weight_entropy"] == pytest.approx(used, abs=1e-6)
        assert result["weight_entropy"] == pytest.approx(result["lambda_net_entropy"], abs=1e-5)
        for method, expected in (("equizero", 0.0), ("equitune", np.log(4)), ("vanilla", 0.0)):
            r = await client.post(URL, files=files, data={"method": method})
            (other,) = r.json()["results"]
            assert other["weight_entropy"] == pytest.approx(expected, abs=1e-6), method  # the weights it used
            assert other["lambda_net_entropy"] == pytest.approx(result["lambda_net_entropy"], abs=1e-5), method
        timing = body["timing"]
        assert timing["batch_size"] >= 1 and timing["queue_ms"] >= 0 and timing["inference_ms"] > 0


async def test_json_base64_and_multiple_images(tiny_models_dir: Path) -> None:
    images = [png_bytes(random_image(i)) for i in range(3)]
    async with serving(make_settings(tiny_models_dir)) as (client, _):
        payload = {"images": [{"b64": base64.b64encode(b).decode()} for b in images], "method": "equizero", "top_k": 3}
        r = await client.post(URL, json=payload)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 3
        for result in results:
            assert result["selected_transform"] in ["identity", "rot90", "rot180", "rot270"]
            chosen = [t for t in result["transforms"] if t["lambda"] == 1.0]
            assert [t["name"] for t in chosen] == [result["selected_transform"]]
            assert len(result["predictions"]) == 3
        # the same images as multipart give the same answers
        files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
        r2 = await client.post(URL, files=files, data={"method": "equizero", "top_k": "3"})
        assert r2.json()["results"] == results


@pytest.mark.parametrize("method", ["equitune", "equizero", "lambda"])
async def test_rotated_png_uploads_get_the_same_answer(tiny_models_dir: Path, method: str) -> None:
    image = random_image(7, 45, 70)
    async with serving(make_settings(tiny_models_dir)) as (client, _):
        answers = []
        for k in range(4):
            files = [("image", ("r.png", png_bytes(np.ascontiguousarray(np.rot90(image, k))), "image/png"))]
            r = await client.post(URL, files=files, data={"method": method, "top_k": "3"})
            answers.append(r.json()["results"][0]["predictions"])
        for other in answers[1:]:
            assert [p["index"] for p in other] == [p["index"] for p in answers[0]]
            assert np.allclose([p["score"] for p in other], [p["score"] for p in answers[0]], atol=1e-3)
        # vanilla, by contrast, sees four different images
        vanilla = []
        for k in range(4):
            files = [("image", ("r.png", png_bytes(np.ascontiguousarray(np.rot90(image, k))), "image/png"))]
            r = await client.post(URL, files=files, data={"method": "vanilla", "top_k": "3"})
            vanilla.append([p["score"] for p in r.json()["results"][0]["predictions"]])
        assert max(abs(a - b) for v in vanilla[1:] for a, b in zip(v, vanilla[0], strict=True)) > 1e-3


async def test_concurrent_requests_share_batches_and_get_their_own_answers(tiny_models_dir: Path) -> None:
    images = [random_image(100 + i) for i in range(12)]
    methods = ["vanilla", "equitune", "equizero", "lambda"]
    async with serving(make_settings(tiny_models_dir, max_batch_size=8, max_wait_ms=100)) as (client, _):
        # alone, one at a time: the reference answers
        alone, queued_ms = [], []
        for i, im in enumerate(images):
            r = await client.post(URL, files=[("image", ("x.png", png_bytes(im), "image/png"))],
                                  data={"method": methods[i % 4], "top_k": "3"})  # fmt: skip
            alone.append(r.json()["results"][0])
            queued_ms.append(r.json()["timing"]["queue_ms"])
        # nothing else was on its way, so a lone request's batch did not wait its 100 ms
        assert float(np.median(queued_ms)) < 50, queued_ms
        before = metric_samples((await client.get("/metrics")).text)

        async def one(i: int) -> dict:
            r = await client.post(URL, files=[("image", ("x.png", png_bytes(images[i]), "image/png"))],
                                  data={"method": methods[i % 4], "top_k": "3"})  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()

        together = await asyncio.gather(*(one(i) for i in range(len(images))))
        assert max(t["timing"]["batch_size"] for t in together) > 1
        for i, answer in enumerate(together):
            assert answer["method"] == methods[i % 4]
            got, want = answer["results"][0], alone[i]
            assert [p["index"] for p in got["predictions"]] == [p["index"] for p in want["predictions"]]
            assert np.allclose([p["score"] for p in got["predictions"]], [p["score"] for p in want["predictions"]],
                               atol=1e-4)  # fmt: skip
            assert got["selected_transform"] == want["selected_transform"]
        after = metric_samples((await client.get("/metrics")).text)

    def bucket(samples: dict, le: str) -> float:
        return samples.get(("equiserve_batch_size_bucket", (("le", le), ("model", "tiny"))), 0.0)

    # batches of more than one image were recorded: fewer batches in the le=1 bucket than in +Inf
    new_total = bucket(after, "+Inf") - bucket(before, "+Inf")
    new_single = bucket(after, "1.0") - bucket(before, "1.0")
    assert new_total < len(images) and new_single < new_total


async def test_metrics_exposition_parses_and_counters_move(tiny_models_dir: Path) -> None:
    async with serving(make_settings(tiny_models_dir)) as (client, _):
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        before = metric_samples(r.text)
        names = {name for name, _ in before}
        assert ("equiserve_model_info", (("backbone", "resnet18"), ("device", "cpu"), ("dtype", "float32"),
                                         ("group", "c4"), ("model", "tiny"))) in before  # fmt: skip
        assert "equiserve_inflight_requests" in names
        files = [("image", ("a.png", png_bytes(random_image(3)), "image/png"))]
        for method in ("equizero", "lambda"):
            assert (await client.post(URL, files=files, data={"method": method})).status_code == 200
        assert (await client.post("/v1/models/nope/classify", files=files)).status_code == 404
        after = metric_samples((await client.get("/metrics")).text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("equiserve_requests_total", model="tiny", endpoint="classify", status="200") == 2
    assert delta("equiserve_requests_total", model="unknown", endpoint="classify", status="404") == 1
    assert delta("equiserve_request_duration_seconds_count", model="tiny", endpoint="classify") == 2
    assert delta("equiserve_queue_duration_seconds_count", model="tiny") == 2
    assert delta("equiserve_inference_duration_seconds_count", model="tiny") >= 1
    assert delta("equiserve_lambda_entropy_count", model="tiny") == 2
    selected = sum(v for (n, labels), v in after.items() if n == "equiserve_selected_transform_total")
    assert selected - sum(v for (n, _), v in before.items() if n == "equiserve_selected_transform_total") == 1
    # sub-millisecond resolution
    assert ("equiserve_queue_duration_seconds_bucket", (("le", "0.0005"), ("model", "tiny"))) in after


async def test_api_key_protects_inference_only(tiny_models_dir: Path) -> None:
    files = [("image", ("a.png", png_bytes(random_image(4)), "image/png"))]
    async with serving(make_settings(tiny_models_dir, api_key="s3cret")) as (client, _):
        assert (await client.get("/health/ready")).status_code == 200
        r = await client.post(URL, files=files)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await client.post(URL, files=files, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await client.post(URL, files=files, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200


async def test_openapi_documents_both_body_forms(tiny_models_dir: Path) -> None:
    async with serving(make_settings(tiny_models_dir)) as (client, _):
        spec = (await client.get("/openapi.json")).json()
        body = spec["paths"]["/v1/models/tiny/classify"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(body)
        assert body["application/json"]["examples"]
        assert (await client.get("/docs")).status_code == 200


async def test_metrics_can_be_protected_health_stays_open(tiny_models_dir: Path) -> None:
    async with serving(make_settings(tiny_models_dir, api_key="k", protect_metrics=True)) as (client, _):
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer k"})).status_code == 200
        assert (await client.get("/health/ready")).status_code == 200

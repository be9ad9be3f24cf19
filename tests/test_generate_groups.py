"""Text groups: word swaps as permutations of token ids, in context, with clear load-time errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from app.equivariance.text import (
    TEXT_WORD_SETS,
    SkippedForm,
    TextGroupError,
    build_text_group,
    canonical_frames,
    parse_axes,
    word_forms,
)

# A hand-made vocabulary with leading-space tokens and bare pieces, as byte-level BPEs have.
VOCAB = [
    "<eos>", " man", "man", " woman", "woman", " Man", "Man", " Woman", "Woman",
    " he", "he", " she", "she", " He", "He", " She", "She",
    " Black", "Black", " White", "White", " gay", "gay", " straight", "straight",
    " Gay", "Gay", " Straight", "Straight", " Bat", "s", "iff", " said", " the", " worked", " as", ".", " ",
    " they", "they", " They", "They", "W", "oman", " boy", "boy", " Boy", "Boy", " girl", " Girl", "G", "irl",
]  # fmt: skip
IDS = {text: i for i, text in enumerate(VOCAB)}
SETS = {"gender": [["man", "woman"], ["he", "she"]], "race": [["Black", "White"]], "orientation": [["gay", "straight"]]}


def tokenize(text: str) -> list[int]:
    """Greedy longest match over VOCAB (what a BPE would give for these strings)."""
    out, i = [], 0
    while i < len(text):
        for j in range(len(text), i, -1):
            if text[i:j] in IDS:
                out.append(IDS[text[i:j]])
                i = j
                break
        else:  # an unknown character: byte pieces, so never a single token
            out += [0, 0]
            i += 1
    return out


WORD_END = torch.tensor([t[-1:].isalnum() for t in VOCAB])


def group(name: str = "gender+race+orientation", **kw):
    return build_text_group(name, tokenize, len(VOCAB), custom_sets=SETS, word_end=WORD_END, **kw)


def ids(*tokens: str) -> torch.Tensor:
    return torch.tensor([IDS[t] for t in tokens])


def text(seq: torch.Tensor) -> str:
    return "".join(VOCAB[i] for i in seq.tolist())


def test_product_group_axioms_and_names() -> None:
    g = group()
    assert g.order == 8 and g.names[0] == "identity"
    assert g.names[1:4] == ["swap:man<->woman", "swap:Black<->White", "swap:gay<->straight"]
    assert g.axes == {"gender": "swap:man<->woman", "race": "swap:Black<->White", "orientation": "swap:gay<->straight"}
    seq = ids(" man", " said", " he", " Black", " gay", "s", "he", " Bat", "man", "He", " the")
    for a, b in itertools.product(range(g.order), repeat=2):
        assert torch.equal(g.act(g.act(seq, b), a), g.act(seq, g.compose(a, b)))
    for a in range(g.order):
        assert g.compose(a, g.inverse(a)) == 0
        assert torch.equal(g.act(g.act(seq, a), g.inverse(a)), seq)
        assert g.compose(a, a) == 0  # every element of a product of swaps is an involution


def test_both_forms_swap_at_a_word_start_and_bare_pieces_stay_inside_words() -> None:
    g = group("gender")
    swap = g.axis_element("gender")
    assert text(g.act(ids("man", " said", " he", "."), swap)) == "woman said she."
    assert text(g.act(ids("He", " worked", " as", " man"), swap)) == "She worked as woman"
    # " Bat"+"man" and "s"+"he"+"iff" contain bare forms as word pieces: not swapped
    assert text(g.act(ids(" Bat", "man", " said", "s", "he", "iff"), swap)) == " Batman saidsheiff"
    # after a non-letter token a bare form starts a word again
    assert text(g.act(ids(".", "he"), swap)) == ".she"
    # the token before position 0 decides its context when decoding continues a text
    assert text(g.act(ids("man"), swap, previous=IDS[" Bat"])) == "man"
    assert text(g.act(ids("man"), swap, previous=IDS["."])) == "woman"


def test_fused_expand_equals_the_reference_action_with_padding_and_context() -> None:
    g = group()
    torch.manual_seed(0)
    batch = torch.randint(1, len(VOCAB), (5, 9))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0  # left padding: the first real token is at a word start
    batch[1, :3] = IDS["<eos>"]
    copies = g.expand(batch, mask=mask).view(g.order, 5, 9)
    for k in range(g.order):
        for b in range(5):
            start = 3 if b == 1 else 0
            assert torch.equal(copies[k, b, start:], g.act(batch[b, start:], k)), (k, b)
    previous = torch.tensor([IDS[" Bat"]] * 5)
    copies = g.expand(batch[:, :1], previous=previous).view(g.order, 5)
    for k in range(g.order):
        for b in range(5):
            assert int(copies[k, b]) == int(g.act(batch[b, :1], k, previous=IDS[" Bat"])[0])


def test_scores_move_with_their_tokens_in_both_contexts() -> None:
    g = group()
    torch.manual_seed(1)
    scores = torch.randn(g.order, 2, len(VOCAB))
    mid = torch.tensor([False, True])
    aligned = g.invert_scores(scores, mid)
    for k in range(g.order):
        for b, inside in enumerate(mid.tolist()):
            previous = IDS[" Bat"] if inside else IDS["."]
            # aligned[k][v] = scores[k][σ_k(v)], σ_k in the row's context
            for v in range(len(VOCAB)):
                moved = int(g.act(torch.tensor([v]), k, previous=previous)[0])
                assert aligned[k, b, v] == scores[k, b, moved]
    rows = g.act_scores_rows(scores[0], torch.tensor([1, 1]), mid)
    assert rows[0, IDS["woman"]] == scores[0, 0, IDS["man"]]  # at a word start "man" -> "woman"
    assert rows[1, IDS["woman"]] == scores[0, 1, IDS["woman"]]  # inside a word bare forms stay
    assert rows[1, IDS[" woman"]] == scores[0, 1, IDS[" man"]]  # leading-space forms always swap


def test_a_word_split_into_several_tokens_is_rejected_at_load_or_skipped_whole() -> None:
    sets = {"gender": [["boy", "girl"]]}
    with pytest.raises(TextGroupError, match=r"'girl' -> \[.*split into several tokens.*on_multi_token: skip"):
        build_text_group("gender", tokenize, len(VOCAB), custom_sets=sets, word_end=WORD_END)
    g = build_text_group("gender", tokenize, len(VOCAB), custom_sets=sets, word_end=WORD_END, on_multi_token="skip")
    assert [s.words for s in g.skipped] == [("boy", "girl"), ("Boy", "Girl")]
    assert isinstance(g.skipped[0], SkippedForm) and "girl" in str(g.skipped[0])
    swap = g.axis_element("gender")
    # the skipped bare form is left alone on BOTH sides: never half-swapped
    assert text(g.act(ids("boy", " boy", "G", "irl"), swap)) == "boy girlGirl"
    assert g.cycles[0][1] == (" boy", " girl")


def test_impossible_sets_fail_with_a_clear_error() -> None:
    with pytest.raises(TextGroupError, match="'woman' is in two equality tuples"):
        build_text_group("g", tokenize, len(VOCAB), custom_sets={"g": [["man", "woman"], ["he", "woman"]]})

    def lowercasing(text: str) -> list[int]:  # "guy" and "man" become one token
        return tokenize(text.replace("guy", "man"))

    with pytest.raises(TextGroupError, match="claimed by"):
        build_text_group("g", lowercasing, len(VOCAB), custom_sets={"g": [["man", "woman"], ["guy", "she"]]})
    with pytest.raises(TextGroupError, match="general word"):
        build_text_group("gender", tokenize, len(VOCAB), custom_sets=SETS, general_words=["he"])
    with pytest.raises(TextGroupError, match="unknown text group axis"):
        parse_axes("gender+caste")
    with pytest.raises(TextGroupError, match="same number"):
        build_text_group("g", tokenize, len(VOCAB), custom_sets={"g": [["man", "woman"], ["he"]]})
    with pytest.raises(TextGroupError, match="unknown word form"):
        word_forms("man", ["plural"])


def test_three_word_sets_are_cycles() -> None:
    g = build_text_group("r", tokenize, len(VOCAB), custom_sets={"r": [["Black", "White", "gay"]]}, forms=["space"])
    assert g.order == 3 and g.names[1] == "cycle:Black->White->gay"
    seq = ids(" Black", " White", " gay")
    assert text(g.act(seq, 1)) == " White gay Black"


def test_general_words_are_single_tokens_fixed_by_the_group() -> None:
    g = group(general_words=["they", "the"])
    general = {VOCAB[i] for i in g.general_ids.tolist()}
    assert general == {" they", "they", " They", "They", " the"}
    assert g.general_mask(torch.device("cpu")).sum() == 5
    for k in range(g.order):
        assert torch.equal(g.perms[k][g.general_ids], g.general_ids)


def test_canonical_frames_make_swapped_prompts_share_a_frame() -> None:
    g = group()
    prompts = [ids(" man", " Black", " gay"), ids(" woman", " White", " gay"), ids(" the", " worked")]
    batch = torch.stack([torch.cat([torch.full((3 - len(p),), 0), p]) for p in prompts])
    copies = g.expand(batch).view(g.order, 3, -1)
    frames = canonical_frames(g, copies, [3, 3, 2])
    swap = g.compose(g.axis_element("gender"), g.axis_element("race"))
    assert frames[1] == g.compose(swap, frames[0])  # h(σ t) = σ h(t)
    assert frames[2] == 0  # a prompt no swap changes stays in the identity frame
    for b, h in enumerate(frames):  # t = h·c, c the smallest copy
        smallest = min(copies[:, b].tolist())
        assert g.act(torch.tensor(smallest), h).tolist() == copies[0, b].tolist()


def test_default_word_sets_are_disjoint_pairs() -> None:
    words = [w for sets in TEXT_WORD_SETS.values() for t in sets for w in t]
    assert len(words) == len(set(words))
    assert ("man", "woman") in TEXT_WORD_SETS["gender"] and ("Black", "White") in TEXT_WORD_SETS["race"]
    assert ("gay", "straight") in TEXT_WORD_SETS["orientation"]

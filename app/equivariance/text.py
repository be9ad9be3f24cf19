"""Text groups for fair generation (EquiLM): demographic word swaps acting on token ids.

A *text group* permutes vocabulary ids: each axis (gender, race, sexual orientation) is an
equality word set such as ``[(man, woman), (he, she), ...]``, and its generator maps every
word of a tuple to the next one (``man -> woman -> man``; a cycle for tuples of three or
more), all tuples of the axis at once. Several axes generate their product group. Because
the group is a ``PermutationGroup`` over the ids, it acts

* on prompts (``expand``: all |G| relabelled copies in one gather) and on sampled tokens
  (``act`` / ``value_maps``), and
* on next-token scores indexed by ids (``invert_scores`` undoes ``σ_g`` on each copy's
  log-probabilities in one gather),

so the EquiLM next-token distribution ``p_G(·|t) = Σ_g w_g σ_g⁻¹·p(·|σ_g t)`` is exactly
equivariant: ``p_G(·|σ t) = σ·p_G(·|t)``.

Tokenizers see words in several *forms*: with a leading space (``" man"``, the usual case
inside a sentence), bare (``"man"``, at the start of a text), and capitalised (``" Man"``,
``"Man"``). Each form of a tuple becomes one cycle of ids. A form that the tokenizer splits
into several tokens cannot be swapped by a permutation of ids: the builder either stops
with an error naming it (``on_multi_token="error"``, the default) or leaves that form of the
whole tuple alone and records it in ``TextGroup.skipped`` (``"skip"``), so a word is never
half-swapped. Two forms that would send one id to two different places are always an error.

R-EquiLM (the relaxed variant of Basu et al.): next-token scores of a set of *general* words
(pronouns, articles and the like, which the group fixes) are taken from the identity copy
only; every other token is combined over the group. It trades exact equivariance of the
general words' probabilities for fluency.

Nothing here knows tokenizers' classes: the builder takes a ``tokenize(str) -> ids``
function, so it is pure torch and testable with any vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from .groups import PermutationGroup
from .methods import Combined, Mixture

__all__ = [
    "DEFAULT_GENERAL_WORDS",
    "TEXT_WORD_SETS",
    "CombineSpace",
    "SkippedForm",
    "TextGroup",
    "TextGroupError",
    "build_text_group",
    "canonical_frames",
    "next_token_distribution",
    "parse_axes",
    "word_forms",
]

Tokenize = Callable[[str], Sequence[int]]

# Equality word sets per axis. Each tuple is one orbit: the swap maps every word to the next
# one in its tuple. Pairs must not share a word ("her" pairs with "his", so "him" is left
# alone: a permutation cannot send "her" to both). Words whose leading-space form SmolLM2's
# tokenizer splits (boyfriend, niece, sir/madam, ...) are left out of the defaults.
TEXT_WORD_SETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gender": (
        ("man", "woman"), ("men", "women"), ("boy", "girl"), ("boys", "girls"),
        ("he", "she"), ("his", "her"), ("himself", "herself"),
        ("father", "mother"), ("fathers", "mothers"), ("son", "daughter"), ("sons", "daughters"),
        ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"), ("husbands", "wives"),
        ("king", "queen"), ("kings", "queens"), ("male", "female"), ("males", "females"),
        ("Mr", "Mrs"), ("gentleman", "lady"), ("gentlemen", "ladies"), ("uncle", "aunt"),
        ("dad", "mom"), ("grandfather", "grandmother"), ("prince", "princess"), ("actor", "actress"),
        ("guy", "gal"), ("masculine", "feminine"), ("groom", "bride"),
    ),
    "race": (("Black", "White"),),
    "orientation": (("gay", "straight"), ("homosexual", "heterosexual")),
}  # fmt: skip

# R-EquiLM's general words: taken from the identity copy only. The group must fix them.
DEFAULT_GENERAL_WORDS: tuple[str, ...] = (
    "I", "me", "my", "mine", "myself", "you", "your", "yours", "yourself", "we", "us", "our", "ours",
    "they", "them", "their", "theirs", "themselves", "it", "its", "itself", "one", "someone", "anyone",
    "everyone", "person", "people", "who", "whom", "whose", "this", "that", "these", "those",
    "the", "a", "an",
)  # fmt: skip

FORMS = ("space", "bare", "capitalized_space", "capitalized_bare")


class TextGroupError(ValueError):
    """A word set that cannot be turned into a permutation of this tokenizer's ids."""


class CombineSpace(str, Enum):
    """Where the copies are averaged.

    ``probs``: ``p_G = Σ_g w_g σ_g⁻¹·p(·|σ_g t)``, a mixture of the copies' distributions
    (the formula of equitune applied to the model's output distribution; our default).
    ``logits``: ``p_G ∝ exp(Σ_g w_g σ_g⁻¹·log p(·|σ_g t))``, a product of experts (what the
    paper's public EquiLM code does: it averages logits). Both are exactly equivariant.
    """

    PROBS = "probs"
    LOGITS = "logits"

    @property
    def mixture(self) -> Mixture:
        return Mixture.LOG_MEAN_EXP if self is CombineSpace.PROBS else Mixture.MEAN


@dataclass(frozen=True)
class SkippedForm:
    """One form of one word tuple left out because the tokenizer splits a word of it."""

    axis: str
    words: tuple[str, ...]  # the surface strings, e.g. (" boyfriend", " girlfriend")
    pieces: tuple[tuple[int, ...], ...]  # their token ids

    def __str__(self) -> str:
        parts = ", ".join(f"{w!r} -> {list(p)}" for w, p in zip(self.words, self.pieces, strict=True))
        return f"{self.axis}: {parts}"


def word_forms(word: str, forms: Sequence[str] = FORMS) -> list[str]:
    """The surface strings of ``word``, one per form, in the order of ``forms`` (may repeat:
    an already capitalised word looks the same in its capitalised forms)."""
    capital = word[:1].upper() + word[1:]
    table = {"space": " " + word, "bare": word, "capitalized_space": " " + capital, "capitalized_bare": capital}
    for form in forms:
        if form not in table:
            raise TextGroupError(f"unknown word form {form!r}; choose from {list(FORMS)}")
    return [table[form] for form in forms]


def parse_axes(name: str, custom: Mapping[str, Sequence[Sequence[str]]] | None = None) -> list[str]:
    """``"gender+race"`` -> ``["gender", "race"]``, each a preset or a custom set."""
    axes = [a.strip() for a in name.split("+") if a.strip()]
    known = {**TEXT_WORD_SETS, **(custom or {})}
    if not axes:
        raise TextGroupError("a text group needs at least one axis, e.g. 'gender' or 'gender+race'")
    for axis in axes:
        if axis not in known:
            raise TextGroupError(f"unknown text group axis {axis!r}; choose from {sorted(known)} or define it")
    if len(set(axes)) != len(axes):
        raise TextGroupError(f"axis listed twice in {name!r}")
    return axes


def _orbit_name(first: Sequence[str]) -> str:
    if len(first) == 2:
        return f"swap:{first[0]}<->{first[1]}"
    return "cycle:" + "->".join(first)


class TextGroup(PermutationGroup):
    """A ``PermutationGroup`` over vocabulary ids built from equality word sets.

    Bare forms (``"man"``, no leading space) are also word *pieces*: SmolLM2 spells
    " Batman" as ``" Bat" + "man"`` and "sheriff" as ``"s" + "her" + "iff"``. So the action
    on a sequence is context-aware: a bare-form id is swapped only at a word start (the
    start of the text, or after a token that does not end in a letter or digit,
    ``word_end[prev] == False``); leading-space forms are swapped everywhere. Every swapped
    word ends in a letter, so the swap never changes a position's context, which keeps this
    a group action on sequences (``σ_g(σ_h t) = σ_gh t``) and keeps the fused expand one
    gather per context. ``perms``/``value_maps`` (the base class' tables) are the word-start
    tables; ``mid_perms``/``mid_value_maps`` leave bare forms alone.

    Keeps what it was built from, for diagnostics: ``cycles`` (axis, surface strings, ids)
    of every swapped form, ``skipped`` forms, and the R-EquiLM ``general_ids``.
    """

    def __init__(
        self,
        name: str,
        generators: Sequence[Tensor],
        generator_names: Sequence[str],
        size: int,
        *,
        cycles: Sequence[tuple[str, tuple[str, ...], tuple[int, ...]]] = (),
        skipped: Sequence[SkippedForm] = (),
        general_ids: Sequence[int] = (),
        bare_ids: Sequence[int] = (),
        word_end: Tensor | None = None,
        axes: Sequence[str] = (),
    ) -> None:
        super().__init__(name, generators, generator_names, size=size)
        self.axes = dict(zip(axes, generator_names, strict=False))  # axis -> its generator's element name
        self.cycles = tuple(cycles)
        self.skipped = tuple(skipped)
        self.general_ids = torch.tensor(sorted(set(general_ids)), dtype=torch.long)
        self.bare_ids = torch.tensor(sorted(set(bare_ids)), dtype=torch.long)
        self.word_end = torch.zeros(size, dtype=torch.bool) if word_end is None else word_end.bool().clone()
        if self.word_end.shape != (size,):
            raise TextGroupError(f"word_end needs one entry per id ({size}), got {tuple(self.word_end.shape)}")
        if bool((self.word_end[self.perms] != self.word_end).any()):
            raise TextGroupError("a swap changes whether a token ends a word; swapped words must end alike")
        # Mid-word tables: bare-form ids stay (they are suffix pieces there), the rest as at a word start.
        keep = torch.zeros(size, dtype=torch.bool)
        keep[self.bare_ids] = True
        self.mid_perms = torch.where(keep, torch.arange(size).expand_as(self.perms), self.perms)
        self.mid_value_maps = self.mid_perms[self.inverse_index]
        self._text_cache: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]] = {}

    # -- tables on a device ------------------------------------------------------------------
    def _text_tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(start perms, mid perms, start value maps, mid value maps, word_end, general mask) on ``device``."""
        if device not in self._text_cache:
            general = torch.zeros(self.size, dtype=torch.bool)
            general[self.general_ids] = True
            self._text_cache[device] = tuple(  # type: ignore[assignment]
                t.to(device)
                for t in (self.perms, self.mid_perms, self.value_maps, self.mid_value_maps, self.word_end, general)
            )
        return self._text_cache[device]

    def general_mask(self, device: torch.device) -> Tensor:
        """``[V]`` bool: True on R-EquiLM's general tokens."""
        return self._text_tables(device)[5]

    def mid_word(self, ids: Tensor, previous: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``[B, T]`` bool: position ``i`` continues a word (its previous token ends in a letter/digit).

        ``previous`` ([B] ids) is the token before position 0 (None: the start of the text);
        ``mask`` ([B, T], 0 on left padding) makes the first real token a word start.
        """
        word_end = self._text_tables(ids.device)[4]
        before = word_end[ids[:, :-1]]
        if mask is not None:
            before = before & mask[:, :-1].bool()
        first = word_end[previous].unsqueeze(1) if previous is not None else before.new_zeros(ids.shape[0], 1)
        return torch.cat([first, before], dim=1)

    def next_mid_word(self, last: Tensor) -> Tensor:
        """``[B]`` bool: the context of the token that follows ``last`` ([B] ids)."""
        return self._text_tables(last.device)[4][last]

    # -- actions -------------------------------------------------------------------------------
    def expand(self, ids: Tensor, previous: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``[B, T]`` ids -> ``[|G|*B, T]``: every copy relabelled in context, copy-major."""
        _, _, start, mid, _, _ = self._text_tables(ids.device)
        inside = self.mid_word(ids, previous, mask)
        copies = torch.where(inside, mid[:, ids], start[:, ids])  # [|G|, B, T]
        return copies.reshape(-1, *ids.shape[1:])

    def act(self, ids: Tensor, g: int, previous: int | None = None) -> Tensor:
        """Reference (unfused, per token) action of ``g`` on one sequence ``[T]`` of ids."""
        out = []
        prev = previous
        for token in ids.tolist():
            table = self.mid_value_maps if prev is not None and bool(self.word_end[prev]) else self.value_maps
            out.append(int(table[g][token]))
            prev = token
        return torch.tensor(out, dtype=ids.dtype, device=ids.device)

    def relabel(self, tokens: Tensor, mid_word: Tensor) -> Tensor:
        """``[B]`` tokens -> ``[|G|, B]``: the token as each copy sees it."""
        _, _, start, mid, _, _ = self._text_tables(tokens.device)
        return torch.where(mid_word, mid[:, tokens], start[:, tokens])

    def invert_scores(self, y: Tensor, mid_word: Tensor | None = None) -> Tensor:
        """Apply ``g⁻¹`` to per-copy next-token scores ``[|G|, B, V]`` (context per row), one gather."""
        start, mid, _, _, _, _ = self._text_tables(y.device)
        inverse = self.inverse_index.to(y.device)
        index = start[inverse].unsqueeze(1).expand(-1, y.shape[1], -1)  # [|G|, B, V]
        if mid_word is not None and bool(mid_word.any()):
            index = torch.where(mid_word.view(1, -1, 1), mid[inverse].unsqueeze(1), index)
        return torch.gather(y, -1, index)

    def act_scores_rows(self, y: Tensor, elements: Tensor, mid_word: Tensor) -> Tensor:
        """``(h_b · y_b)`` for scores ``[B, V]``, one element ``h_b`` per row, in each row's context."""
        start, mid, _, _, _, _ = self._text_tables(y.device)
        index = torch.where(mid_word.unsqueeze(1), mid[elements], start[elements])
        return torch.gather(y, -1, index)

    def axis_element(self, axis: str) -> int:
        """The element that swaps ``axis`` alone (its generator)."""
        if axis not in self.axes:
            raise KeyError(f"group {self.name!r} has no axis {axis!r}; it has {list(self.axes)}")
        return self.element(self.axes[axis]).index

    def swapped_words(self) -> list[tuple[str, ...]]:
        return [words for _, words, _ in self.cycles]


def build_text_group(
    name: str,
    tokenize: Tokenize,
    vocab_size: int,
    *,
    custom_sets: Mapping[str, Sequence[Sequence[str]]] | None = None,
    forms: Sequence[str] = FORMS,
    on_multi_token: str = "error",
    general_words: Sequence[str] | None = DEFAULT_GENERAL_WORDS,
    word_end: Tensor | None = None,
) -> TextGroup:
    """Build the group ``name`` (axes joined by ``+``) over ``vocab_size`` ids.

    ``tokenize`` maps a string to token ids without special tokens; ``word_end`` ([V] bool)
    says which tokens end in a letter or digit (then a bare form after them is a word piece
    and stays; None: every position is a word start, right for word-level vocabularies). Raises
    ``TextGroupError`` at load time for anything that would make a wrong swap: a form split
    into several tokens (unless ``on_multi_token="skip"``), a form that is not one id of the
    vocabulary, an id claimed by two different words, a general word that the group moves.
    """
    if on_multi_token not in ("error", "skip"):
        raise TextGroupError(f"on_multi_token must be 'error' or 'skip', not {on_multi_token!r}")
    sets = {**TEXT_WORD_SETS, **(custom_sets or {})}
    axes = parse_axes(name, custom_sets)
    owner: dict[int, tuple[str, str]] = {}  # id -> (axis, surface) of the form that claimed it
    spaced: set[int] = set()  # ids reached by a leading-space form: swapped in every context
    generators: list[Tensor] = []
    generator_names: list[str] = []
    cycles: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = []
    skipped: list[SkippedForm] = []
    placed: dict[str, str] = {}  # word -> its axis: a word in two tuples could not be swapped both ways
    for axis in axes:
        tuples = [tuple(t) for t in sets[axis]]
        if not tuples or any(len(t) < 2 for t in tuples) or len({len(t) for t in tuples}) != 1:
            raise TextGroupError(f"axis {axis!r}: every tuple needs the same number (>= 2) of words")
        # value map sigma (id -> id) of this axis' generator, identity elsewhere
        sigma = torch.arange(vocab_size)
        for words in tuples:
            for word in words:
                if word in placed:
                    raise TextGroupError(
                        f"{word!r} is in two equality tuples ({placed[word]} and {axis}): "
                        f"a permutation cannot swap it both ways"
                    )
                placed[word] = axis
            per_word_forms = [word_forms(w, forms) for w in words]
            for surfaces in dict.fromkeys(zip(*per_word_forms, strict=True)):  # each distinct form once
                pieces = tuple(tuple(int(i) for i in tokenize(s)) for s in surfaces)
                if any(len(p) != 1 for p in pieces):
                    form = SkippedForm(axis, tuple(surfaces), pieces)
                    if on_multi_token == "error":
                        raise TextGroupError(
                            f"{form}: a word of this form is split into several tokens, so no permutation of "
                            f"token ids can swap it. Remove the word from the set, or set on_multi_token: skip "
                            f"to leave this form unswapped"
                        )
                    skipped.append(form)
                    continue
                ids = tuple(p[0] for p in pieces)
                if len(set(ids)) != len(ids):
                    raise TextGroupError(f"axis {axis!r}: {surfaces} share a token id {ids}")
                for surface, token in zip(surfaces, ids, strict=True):
                    if not 0 <= token < vocab_size:
                        raise TextGroupError(f"{surface!r} is token {token}, outside the model's {vocab_size} ids")
                    if surface.startswith(" "):
                        spaced.add(token)
                    claimed = owner.setdefault(token, (axis, surface))
                    # The same id reached twice is fine only for another form of the same word of
                    # the same axis (a tokenizer without leading-space tokens, or one that lowercases).
                    if claimed != (axis, surface) and (
                        claimed[0] != axis or claimed[1].strip().lower() != surface.strip().lower()
                    ):
                        raise TextGroupError(
                            f"token {token} is claimed by {claimed[1]!r} ({claimed[0]}) and by "
                            f"{surface!r} ({axis}): a permutation cannot swap it both ways"
                        )
                known = [(src, dst) for src, dst in zip(ids, ids[1:] + ids[:1], strict=True)]
                if all(int(sigma[src]) == src for src, _ in known):
                    for src, dst in known:
                        sigma[src] = dst
                    cycles.append((axis, tuple(surfaces), ids))
                elif any(int(sigma[src]) != dst for src, dst in known):
                    raise TextGroupError(f"axis {axis!r}: {surfaces} conflicts with an earlier form")
        if torch.equal(sigma, torch.arange(vocab_size)):
            raise TextGroupError(f"axis {axis!r}: no word of it is a single token; nothing to swap")
        # PermutationGroup generators are gather indices: gen[sigma(v)] = v.
        gather = torch.empty_like(sigma)
        gather[sigma] = torch.arange(vocab_size)
        generators.append(gather)
        generator_names.append(_orbit_name(tuples[0]))

    general_ids: list[int] = []
    for word in general_words or ():
        for surface in dict.fromkeys(word_forms(word, forms)):
            pieces = list(tokenize(surface))
            if len(pieces) != 1:
                continue  # a general word only masks single tokens; a split form is simply not masked
            token = int(pieces[0])
            if token in owner:
                raise TextGroupError(
                    f"general word {surface!r} is swapped by {owner[token][0]}: general words are fixed"
                )
            general_ids.append(token)
    return TextGroup(
        name,
        generators,
        generator_names,
        vocab_size,
        cycles=cycles,
        skipped=skipped,
        general_ids=general_ids,
        bare_ids=[token for token in owner if token not in spaced],
        word_end=word_end,
        axes=axes,
    )


# ---------------------------------------------------------------------------------------
# Next-token combination and the canonical frame of a prompt
# ---------------------------------------------------------------------------------------


def next_token_distribution(combined: Combined, aligned: Tensor, general_mask: Tensor | None = None) -> Combined:
    """The EquiLM next-token log-distribution ``[B, V]`` from the combination of the aligned
    per-copy log-probabilities ``aligned`` ``[|G|, B, V]`` (``aligned[g] = σ_g⁻¹·log p(·|σ_g t)``).

    ``combined`` comes from ``combine`` (through ``EquivariantModel.combine_aligned``) with the
    mixture of ``CombineSpace.mixture``. With ``general_mask`` (R-EquiLM) the masked tokens take
    the identity copy's log-probability; the result is renormalised. (Vanilla needs none of
    this: its output is copy 0's distribution as it is.)

    Equizero takes the copy of least loss, and *all* copies tied with it share the weight.
    Ties are the rule, not the exception, for text: a prompt that mentions only gender is
    left unchanged by the race swap, so two copies read the same context, lose the same,
    and differ only in which way round their output is aligned. Picking the first index of
    a tie would break equivariance; averaging the tied copies (a coset of the prompt's
    stabiliser) keeps it, and is the plain argmin whenever the minimum is unique.
    """
    out = combined.output
    if general_mask is not None:
        out = torch.where(general_mask, aligned[0], out)
    return Combined(torch.log_softmax(out, dim=-1), combined.weights, combined.selected)


def canonical_frames(group: PermutationGroup, copies: Tensor, lengths: Sequence[int]) -> list[int]:
    """For each prompt, the element ``h`` with ``t = h·c``, ``c`` the smallest copy of ``t``.

    ``copies`` is ``[|G|, B, T]`` (left-padded: prompt ``b`` is its last ``lengths[b]`` ids),
    copy ``g`` being ``σ_g t``. ``c`` is the lexicographically smallest of the copies, the
    same for every prompt of an orbit; if copy ``g`` is it, ``h = g⁻¹``. Sampling in the
    frame of ``c`` and relabelling the token by ``h`` makes seeded sampling equivariant:
    the swapped prompt ``σ t`` has frame ``σ h`` whenever the group acts freely on ``t``, so
    the same random draw gives the swapped token. Ties (a prompt that some swap leaves
    unchanged) go to the smallest element index.
    """
    frames = []
    rows = copies.tolist()
    for b, length in enumerate(lengths):
        seqs = [rows[g][b][len(rows[g][b]) - length :] for g in range(group.order)]
        best = min(range(group.order), key=lambda g: seqs[g])
        frames.append(group.inverse(best))
    return frames

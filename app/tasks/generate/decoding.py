"""EquiLM decoding: all |G| copies of all requests of a batch, one forward per step, KV cache.

A batch of requests (each with its own method, sampling settings and seed) is decoded
together. Every step:

1. ONE backbone call on ``[|G|·B, L]`` ids (the prompt at the first step, then one token):
   copy ``g`` of request ``b`` is ``σ_g`` of its text, with its own rows of the KV cache;
2. per-copy next-token log-probabilities are aligned (``invert_scores``: ``σ_g⁻¹``) and the
   λ-net scores each copy from its last hidden state;
3. per (method, R-EquiLM) subset of the batch, ``combine`` (then ``next_token_distribution``) gives the EquiLM
   distribution ``[B, V]``;
4. each request samples its token *in its canonical frame* with its own seeded generator
   (greedy: argmax) and the token is fed to each copy relabelled by ``σ_g``.

Why the canonical frame: with a shared random stream, sampling from ``σ·p`` does not give
``σ`` of the sample from ``p`` (inverse-CDF sampling depends on the order of the ids). Every
prompt ``t`` is ``h·c`` for the smallest copy ``c`` of its orbit; sampling from ``h⁻¹·p_G``
(the same vector for ``t`` and ``σ t``, because ``p_G`` is equivariant) and relabelling the
draw by ``h`` makes ``generate(σ t, seed) = σ generate(t, seed)`` whenever the group acts
freely on the prompt — for greedy decoding too, whose ties then break equivariantly.

A vanilla-only batch runs the identity copy alone (|G| times cheaper). Finished requests
leave the batch (their cache rows are dropped) so they cost nothing while others go on.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from app.equivariance import Method, group_rows, lambda_entropy
from app.equivariance.text import canonical_frames, next_token_distribution

from .messages import GeneratedToken, GenerationResult, TokenEvent

if TYPE_CHECKING:
    from app.backbones.causal_lm import CausalLM
    from app.equivariance import EquivariantModel, LambdaNet
    from app.equivariance.text import TextGroup

    from .spec import GenerateSpec


class Decodable(Protocol):
    """What a ``Decoder`` uses of its model (``GenerateModel``)."""

    lm: CausalLM
    group: TextGroup
    equivariant: EquivariantModel
    lambda_net: LambdaNet
    device: torch.device
    spec: GenerateSpec


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    method: Method
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    relaxed: bool = False
    on_start: Callable[[], None] | None = None
    on_token: Callable[[TokenEvent], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Track:
    """Per-request state while decoding."""

    request: GenerationRequest
    generator: torch.Generator
    frame: int
    tokens: list[GeneratedToken] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    emitted: str = ""
    weight_sum: Tensor | None = None
    entropy_sum: float = 0.0
    selected: Counter = field(default_factory=Counter)
    steps: int = 0
    finish: str | None = None


def sample_token(logprobs: Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """One token from ``[V]`` log-probabilities: greedy at temperature 0, else top-k sampling.

    Top-k keeps every id whose score ties the k-th: the result then depends on the scores
    only, not on how a sort orders equal values.
    """
    if temperature <= 0:
        return int(logprobs.argmax())
    # From the best score down and in float64: at a tiny temperature (one float32 rounds to 0, or a
    # subnormal one) every score over it would be -inf or NaN and leave nothing to sample; shifted,
    # the best stays 0 (softmax does not change) and the sample tends to greedy, as it should.
    scores = (logprobs.double() - logprobs.max().double()) / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


@dataclass
class _Prefill:
    """The first forward of a batch: prompts left-padded, all copies, one backbone call."""

    n: int  # copies run: |G|, or 1 for a vanilla-only batch
    ids: Tensor  # [B, T] left-padded prompts
    lengths: list[int]
    copies: Tensor  # [n*B, T] copy-major
    attention: Tensor  # [n*B, T]
    positions: Tensor  # [n*B, T]
    hidden: Tensor  # [n*B, D] last position
    logits: Tensor  # [n*B, V] last position
    cache: object


@dataclass
class _Combined:
    """One step's EquiLM distribution per row, and how it was made."""

    out: Tensor  # [b, V] normalised log-probabilities
    weights: Tensor  # [n, b]
    selected: list[int]  # equizero's copy per row, -1 otherwise
    entropies: list[float]  # λ-net weight entropy per row
    mid: Tensor  # [b] context of the next position (True: inside a word)


class Decoder:
    """Decodes batches of ``GenerationRequest`` on one ``GenerateModel``."""

    def __init__(self, model: Decodable) -> None:
        self.model = model
        self.lm = model.lm
        self.group = model.group
        self.equivariant = model.equivariant

    # -- the pieces ----------------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], use_group: bool) -> _Prefill:
        lm, group, device = self.lm, self.group, self.model.device
        n = group.order if use_group else 1
        batch, lengths = len(prompts), [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.full((batch, width), lm.pad_id, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, width - lengths[b] :] = torch.tensor(prompt)
            mask[b, width - lengths[b] :] = 1
        ids, mask = ids.to(device), mask.to(device)
        copies = ids
        if use_group:
            copies = group.expand(ids, mask=mask)  # [n*B, T], copy-major, in one gather
            copies = torch.where(mask.repeat(n, 1).bool(), copies, lm.pad_id)
        attention = mask.repeat(n, 1)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        hidden, logits, cache = lm.step(copies, attention, positions, lm.new_cache())
        return _Prefill(n, ids, lengths, copies, attention, positions, hidden, logits, cache)

    def combine(
        self, n: int, hidden: Tensor, logits: Tensor, last: Tensor, rows: list[tuple[Method, bool]]
    ) -> _Combined:
        """The EquiLM next-token distribution of each row (``rows[j]`` = its method and R-EquiLM flag)."""
        group, b = self.group, len(rows)
        logprobs = torch.log_softmax(logits, dim=-1).view(n, b, -1)
        mid = group.next_mid_word(last)
        if n > 1:
            aligned = self.equivariant.align(logprobs, mid_word=mid)  # σ_g⁻¹ on each copy, one gather
            log_lambda = self.model.lambda_net(hidden).view(n, b)
            entropies = lambda_entropy(torch.softmax(log_lambda.float(), dim=0)).tolist()
        else:
            aligned, log_lambda, entropies = logprobs, None, [0.0] * b
        out = torch.empty_like(aligned[0])
        weights = torch.zeros(n, b, device=out.device)
        selected = [-1] * b
        general = group.general_mask(out.device)
        for (method, relaxed), cols in group_rows(rows).items():
            index = torch.tensor(cols, device=out.device)
            subset = aligned.index_select(1, index)
            combined = self.equivariant.combine_aligned(
                subset, method, log_lambda.index_select(1, index) if log_lambda is not None else None
            )
            if method is not Method.VANILLA:
                combined = next_token_distribution(combined, subset, general if relaxed else None)
            out[index] = combined.output
            weights[:, index] = combined.weights.to(weights.dtype)
            if combined.selected is not None:
                for c, choice in zip(cols, combined.selected.tolist(), strict=True):
                    selected[c] = choice
        return _Combined(out, weights, selected, entropies, mid)

    @torch.inference_mode()
    def distributions(self, prompts: list[list[int]], method: Method | str, relaxed: bool = False) -> Tensor:
        """Next-token log-distributions ``[B, V]`` of ``prompts`` under ``method`` (evaluation)."""
        method = Method(method)
        first = self.prefill(prompts, use_group=method is not Method.VANILLA)
        rows = [(method, relaxed)] * len(prompts)
        return self.combine(first.n, first.hidden, first.logits, first.ids[:, -1], rows).out

    def copy_prompts(self, first: _Prefill) -> list[list[str]]:
        """Per request, the text of each copy's prompt: the tokens the copy read, decoded (a vanilla-only
        batch ran the identity alone: the other copies are expanded here, for the answer only)."""
        width, batch = first.ids.shape[1], len(first.lengths)
        copies = first.copies if first.n > 1 else self.group.expand(first.ids, mask=first.attention)
        rows = copies.view(self.group.order, batch, width).cpu().tolist()
        return [
            [self.lm.decode(rows[g][b][width - length :]) for g in range(self.group.order)]
            for b, length in enumerate(first.lengths)
        ]

    def frames(self, first: _Prefill, requests: list[GenerationRequest]) -> list[int]:
        if first.n == 1:
            return [0] * len(requests)
        copies = first.copies.view(first.n, len(requests), -1)
        canonical = canonical_frames(self.group, copies, first.lengths)
        return [canonical[b] if r.method is not Method.VANILLA else 0 for b, r in enumerate(requests)]

    # -- a batch, to its end -------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
        lm, group, device = self.lm, self.group, self.model.device
        for request in requests:
            if request.on_start is not None:
                request.on_start()
        use_group = any(r.method is not Method.VANILLA for r in requests)
        first = self.prefill([r.prompt_ids for r in requests], use_group)
        n, cache, hidden, logits, attention = first.n, first.cache, first.hidden, first.logits, first.attention
        frames = self.frames(first, requests)
        prompts = self.copy_prompts(first)
        generators = [torch.Generator(device=device).manual_seed(r.seed) for r in requests]
        tracks = [_Track(r, g, f) for r, g, f in zip(requests, generators, frames, strict=True)]
        next_position = first.positions[:, -1:] + 1
        last = first.ids[:, -1]  # the last prompt token of each request (prompts are left-padded)
        active = list(range(len(requests)))
        while True:
            tokens, mid = self._step(tracks, active, n, hidden, logits, last)
            keep = [j for j, b in enumerate(active) if tracks[b].finish is None]
            if not keep:
                break
            if len(keep) < len(active):  # finished requests leave: drop their rows of every copy
                rows = torch.tensor([g * len(active) + j for g in range(n) for j in keep], device=device)
                cache = lm.select(cache, rows)
                attention, next_position = attention[rows], next_position[rows]
                index = torch.tensor(keep, device=device)
                tokens, mid = tokens[index], mid[index]
                active = [active[j] for j in keep]
            feed = group.relabel(tokens, mid).reshape(-1, 1) if use_group else tokens.view(-1, 1)
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
            hidden, logits, cache = lm.step(feed, attention, next_position, cache)
            next_position = next_position + 1
            last = tokens
        return [
            self._result(track, length, use_group, texts)
            for track, length, texts in zip(tracks, first.lengths, prompts, strict=True)
        ]

    def _step(
        self, tracks: list[_Track], active: list[int], n: int, hidden: Tensor, logits: Tensor, last: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Combine, sample and record one token per active request; returns (tokens [b], context [b])."""
        group, b = self.group, len(active)
        step = self.combine(
            n, hidden, logits, last, [(tracks[t].request.method, tracks[t].request.relaxed) for t in active]
        )
        out, mid = step.out, step.mid
        # Sample in the canonical frame: from h⁻¹·p, then relabel the draw by h.
        frames = torch.tensor([tracks[t].frame for t in active], device=out.device)
        inverse = group.inverse_index.to(out.device)[frames]
        canonical = group.act_scores_rows(out, inverse, mid) if n > 1 else out
        drawn = torch.tensor(
            [
                sample_token(canonical[j], tracks[t].request.temperature, tracks[t].request.top_k, tracks[t].generator)
                for j, t in enumerate(active)
            ],
            device=out.device,
        )
        tokens = group.relabel(drawn, mid)[frames, torch.arange(b, device=out.device)] if n > 1 else drawn
        token_list = tokens.tolist()
        logprob_list = out.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
        weight_rows = step.weights.T.cpu()
        for j, t in enumerate(active):
            self._record(tracks[t], token_list[j], logprob_list[j], weight_rows[j], step.entropies[j], step.selected[j])
        return tokens, mid

    def _record(
        self, track: _Track, token: int, logprob: float, weights: Tensor, entropy: float, selected: int
    ) -> None:
        request = track.request
        track.steps += 1
        track.weight_sum = weights if track.weight_sum is None else track.weight_sum + weights
        track.entropy_sum += entropy
        if selected >= 0:
            track.selected[selected] += 1
        if token in self.lm.eos_ids:
            track.finish = "eos"
            return
        track.ids.append(token)
        generated = GeneratedToken(token, self.lm.token_text(token), logprob)
        track.tokens.append(generated)
        if request.on_token is not None:
            text = self.lm.decode(track.ids)
            delta = ""
            if not text.endswith("\ufffd") and text.startswith(track.emitted):  # hold back half a character
                delta, track.emitted = text[len(track.emitted) :], text
            request.on_token(TokenEvent(len(track.tokens) - 1, token, generated.text, logprob, delta))
        if len(track.ids) >= request.max_new_tokens:
            track.finish = "length"
        elif request.cancelled.is_set():
            track.finish = "cancelled"

    def _result(self, track: _Track, prompt_tokens: int, use_group: bool, prompts: list[str]) -> GenerationResult:
        n = self.group.order
        if use_group and track.weight_sum is not None:
            weights = (track.weight_sum / max(track.steps, 1)).tolist()
        else:  # a vanilla-only batch ran the identity copy alone
            weights = [1.0] + [0.0] * (n - 1)
        vanilla = track.request.method is Method.VANILLA
        selected = self.group.names[track.selected.most_common(1)[0][0]] if track.selected else None
        return GenerationResult(
            tokens=track.tokens,
            text=self.lm.decode(track.ids),
            finish_reason=track.finish or "length",
            weights=weights,
            prompts=prompts,
            selected_transform=selected,
            lambda_net_entropy=None if vanilla or not use_group else track.entropy_sum / max(track.steps, 1),
            frame=self.group.names[track.frame],
            prompt_tokens=prompt_tokens,
            seed=track.request.seed,
            temperature=track.request.temperature,
            top_k=track.request.top_k,
            relaxed=track.request.relaxed,
        )

    def warmup(self, batch_size: int) -> None:
        """A short decode of a full batch with every method, so kernels and caches are ready."""
        methods = list(self.model.spec.methods)
        prompt = self.lm.encode("The man worked as") or [self.lm.pad_id]
        requests = [
            GenerationRequest(prompt, 2, methods[i % len(methods)], temperature=1.0, top_k=5, seed=i)
            for i in range(batch_size)
        ]
        for result in self(requests):
            if isinstance(result, BaseException):
                raise result

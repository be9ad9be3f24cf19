"""Equivariant sequence-to-sequence translation: one group acting on input and output ids, four methods.

A ``SequenceGroup`` is one finite group given by two ``PermutationGroup`` actions with the same
elements in the same order: ``input`` on the ids of commands (``jump <-> run``) and ``output`` on the
ids of actions (``I_JUMP <-> I_RUN``). Writing ``g·x`` and ``g·y`` for the two actions, a translator
``T`` is equivariant when ``T(g·x) = g·T(x)`` for every command ``x`` and element ``g``.

With a pretrained (non-equivariant) greedy seq2seq model ``M`` and ``p(·| x, y_<t)`` its next-token
distribution, the methods are (``w`` the copies' weights; all decode in one batched forward a step):

* vanilla   ``M(x)``: plain greedy decoding of the command itself.
* equitune / λ (lock step): copy ``g`` reads ``g·x`` and is fed ``g·y_<t``; the step's distributions are
  aligned (``g⁻¹`` on the output ids) and combined, ``P_t = Σ_g w_g g⁻¹·p(·| g·x, g·y_<t)`` with
  ``w_g = 1/|G|`` (equitune) or ``w_g = λ(g·x) / Σ_h λ(h·x)`` (λ-equitune, the λ-net reading each
  copy's encoder features), ``y_t = argmax P_t``, and ``g·y_t`` is fed back to copy ``g``. By default
  ``combine`` mixes the copies' *distributions* (``Mixture.LOG_MEAN_EXP``); ``Mixture.MEAN`` averages
  their log-probabilities instead (a product of experts, what the paper's code does with its outputs).
* equizero (per sequence, as the paper): every copy decodes alone, ``o_g = M(g·x)``; the copy with the
  least loss ``ℓ_g`` (``ZeroLoss.NEG_MAX_PROB``: minus the mean over its steps of the probability of
  the token it chose, i.e. the highest mean max-probability; or the mean entropy) is answered mapped
  back: ``T(x) = g*⁻¹·o_g*``.

Exactness. In exact arithmetic all three are equivariant: the copies of ``h·x`` are those of ``x``
reordered (copy ``g`` of ``h·x`` is copy ``gh`` of ``x``), so the combined distribution of ``h·x`` is
``h·P`` and the chosen token ``h·y_t``. Two things break that in practice, and we remove both:

1. *Floating point and ties.* Reordered sums round differently, and an argmax tie is broken by the
   lowest id, which is not a rule that commutes with relabelling. So every command is decoded in the
   frame of its **canonical copy** ``c``: the lexicographically smallest of ``{g·x}``, the same sequence
   for every command of an orbit, with ``x = k·c``. We decode ``c`` (its |G| copies are ``x``'s copies,
   in a fixed order), get ``T(c)`` and answer ``T(x) = k·T(c)``. Then ``T(h·x) = h·T(x)`` holds bit for
   bit, whatever the rounding, because both are computed from the same ``c`` (commands of one batch
   with the same canonical copy are decoded once).
2. *Commands the group fixes.* If ``s·x = x`` (``walk twice`` under ``jump <-> run``) then equivariance
   demands ``T(x) = T(s·x) = s·T(x)``: the answer may only hold tokens that ``s`` fixes. No tie-break
   can give that if the model's best token is one that ``s`` moves (``I_JUMP`` for ``walk twice``): it
   is exactly tied with its image (``I_RUN``). So every greedy choice is made among the tokens fixed by
   the stabiliser ``Stab(·) = {s : s·x = x}`` of what the copy reads (for the lock-step methods, of
   ``c``; for each equizero copy, of ``g·c``; the prefix is always fixed by it too). Commands with a
   trivial stabiliser (a swapped word in them, the usual case) are untouched, and a trained model's
   best token for a fixed command is a fixed one anyway, so this changes nothing there; it is what
   makes equivariance exact for every command, random models included. Vanilla is never restricted.
   ``k`` is unique up to ``Stab(c)``, which fixes ``T(c)``, so ``k·T(c)`` does not depend on the choice.

Per-copy diagnostics (``Decoded.copies``) are what each copy alone produced, mapped back to the
command's frame: ``g⁻¹·M(g·x)``, with the same stabiliser rule (so equizero's answer is one of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .batches import group_rows
from .groups import GroupElement, PermutationGroup
from .lambda_net import LambdaNet
from .methods import Method, Mixture, ZeroLoss, combine, equizero_weights, lambda_entropy
from .model import Copies
from .text import canonical_frames

__all__ = [
    "Decoded",
    "SequenceGroup",
    "StepModel",
    "canonicalize",
    "decode",
    "fixed_tokens",
    "stabilizer",
    "teacher_forced_copies",
]


class SequenceGroup:
    """One group acting on input ids (``input``) and on output ids (``output``) with the same elements.

    Built from generators given as *value maps* (``v -> σ(v)``, e.g. ``jump -> run``), one per
    generator on each side; both closures must give the same elements (the same names, composition
    table and inverses), i.e. both actions are faithful. ``fixed_inputs`` / ``fixed_outputs`` (padding,
    start and end of sequence) are checked to be fixed by every element.
    """

    def __init__(
        self,
        name: str,
        input_maps: Sequence[Sequence[int]],
        output_maps: Sequence[Sequence[int]],
        generator_names: Sequence[str],
        *,
        fixed_inputs: Sequence[int] = (),
        fixed_outputs: Sequence[int] = (),
    ) -> None:
        if not (len(input_maps) == len(output_maps) == len(generator_names)):
            raise ValueError("one input map, one output map and one name per generator")
        self.name = name
        self.input = PermutationGroup(name, [_gather_index(m) for m in input_maps], generator_names, _size(input_maps))
        self.output = PermutationGroup(
            name, [_gather_index(m) for m in output_maps], generator_names, _size(output_maps)
        )
        if self.input.names != self.output.names or not torch.equal(self.input.table, self.output.table):
            raise ValueError(f"group {name!r}: the input and output actions do not generate the same group")
        # Powers read better than repeated words: "(a->b->c)^2" instead of "a->b->c·a->b->c".
        elements = tuple(GroupElement(e.index, _power_name(e.name)) for e in self.input.elements)
        self.input.elements = self.output.elements = elements
        for side, ids in ((self.input, fixed_inputs), (self.output, fixed_outputs)):
            if ids and bool((side.value_maps[:, list(ids)] != torch.tensor(list(ids))).any()):
                raise ValueError(f"group {name!r} moves a special token {list(ids)}")

    @property
    def order(self) -> int:
        return self.input.order

    def __len__(self) -> int:
        return self.order

    @property
    def names(self) -> list[str]:
        return self.input.names

    @property
    def inverse_index(self) -> Tensor:
        return self.input.inverse_index

    def compose(self, g: int, h: int) -> int:
        """``g*h``: act with ``h`` first, then ``g``."""
        return self.input.compose(g, h)

    def inverse(self, g: int) -> int:
        return self.input.inverse(g)

    def act_output(self, tokens: Sequence[int], g: int) -> list[int]:
        """``g·y`` for one output sequence (a list of ids)."""
        value_map = self.output.value_maps[g].tolist()
        return [value_map[t] for t in tokens]

    def __repr__(self) -> str:
        return f"SequenceGroup({self.name!r}, elements={self.names})"


def _power_name(name: str) -> str:
    """Consecutive equal factors of an element's name as a power: ``a·a·b`` -> ``(a)^2·b``."""
    factors = name.split("·")
    out: list[str] = []
    i = 0
    while i < len(factors):
        j = i
        while j < len(factors) and factors[j] == factors[i]:
            j += 1
        power = j - i
        out.append(factors[i] if power == 1 else f"({factors[i]})^{power}")
        i = j
    return "·".join(out)


def _size(maps: Sequence[Sequence[int]]) -> int | None:
    return len(maps[0]) if maps else None


def _gather_index(value_map: Sequence[int]) -> Tensor:
    """``PermutationGroup`` generators are gather indices: ``gen[σ(v)] = v``."""
    sigma = torch.as_tensor(list(value_map), dtype=torch.long)
    gather = torch.empty_like(sigma)
    gather[sigma] = torch.arange(sigma.numel())
    return gather


# ---------------------------------------------------------------------------------------
# Canonical frames and stabilisers
# ---------------------------------------------------------------------------------------


def stabilizer(group: PermutationGroup, ids: Tensor) -> Tensor:
    """``[n, R]`` bool: element ``s`` fixes row ``r`` of ``ids`` ``[R, L]`` (``s·x_r = x_r``)."""
    images = group.expand(ids).view(group.order, *ids.shape)
    return (images == ids.unsqueeze(0)).all(-1)


def fixed_tokens(group: PermutationGroup, stab: Tensor) -> Tensor:
    """``[R, V]`` bool: token ``v`` is fixed by every element of row ``r``'s stabiliser ``stab[:, r]``."""
    value_maps = group.value_maps.to(stab.device)
    moved = value_maps != torch.arange(group.size, device=stab.device)  # [n, V]
    return ~((stab.T.float() @ moved.float()) > 0)


def canonicalize(group: PermutationGroup, ids: Tensor) -> tuple[Tensor, list[int]]:
    """``([B, L] canonical copies c, frames k)`` of right-padded commands ``ids`` with ``x_b = k_b·c_b``.

    ``c`` is the lexicographically smallest copy (the padding is fixed and in place in every copy,
    so comparing whole rows is comparing the commands).
    """
    n, (batch, width) = group.order, ids.shape
    copies = group.expand(ids).view(n, batch, width)
    frames = canonical_frames(group, copies, [width] * batch)  # k_b with x_b = k_b·c_b
    first = group.inverse_index[torch.tensor(frames, dtype=torch.long)].to(ids.device)  # c_b = k_b⁻¹·x_b
    return copies[first, torch.arange(batch, device=ids.device)], frames


# ---------------------------------------------------------------------------------------
# The model's side
# ---------------------------------------------------------------------------------------


class StepModel(Protocol):
    """What the decoder needs of a seq2seq model (``app.tasks.translate.seq2seq.Seq2Seq`` is one)."""

    def begin(self, src: Tensor) -> tuple[Any, Tensor]:
        """Right-padded ids ``[R, L]`` -> (decoder state, encoder features ``[R, D]`` for the λ-net)."""
        ...

    def step(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        """The previous tokens ``[R]`` -> (next-token log-probabilities ``[R, V]``, the new state)."""
        ...

    def teacher_forced(self, src: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """``[R, L]`` and decoder inputs ``[R, T]`` -> (log-probabilities ``[R, T, V]``, features ``[R, D]``)."""
        ...


def teacher_forced_copies(
    model: StepModel, group: SequenceGroup, src: Tensor, tgt_in: Tensor, lambda_net: LambdaNet | None = None
) -> Copies:
    """Training: all copies in one call, copy ``g`` reading ``g·x`` and fed ``g·y_<t`` (the gold prefix).

    ``aligned`` ``[n, B, T, V]`` holds ``g⁻¹·log p(·| g·x, g·y_<t)``; ``log_lambda`` ``[n, B]`` the λ-net's.
    """
    n, batch = group.order, src.shape[0]
    log_probs, features = model.teacher_forced(group.input.expand(src), group.output.expand(tgt_in))
    aligned = group.output.invert_scores(log_probs.view(n, batch, *log_probs.shape[1:]))
    log_lambda = lambda_net(features).view(n, batch) if lambda_net is not None else None
    return Copies(features.view(n, batch, -1), log_lambda, aligned)


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """One command's translation, in the command's own frame; per-element lists are indexed by ``g``."""

    tokens: list[int]  # the method's answer, without the end of sequence
    finished: bool  # ended with the end of sequence within the length limit
    weights: list[float]  # each copy's weight in the answer (equizero: shared by copies tied at the least loss)
    selected: int | None  # equizero's g*; None for the other methods
    lambda_entropy: float | None  # of the λ-net's normalised weights (None without a λ-net)
    copies: list[list[int]] | None  # g⁻¹·M(g·x): what copy g alone produced (None when not asked for)
    copies_finished: list[bool] | None
    losses: list[float] | None  # equizero's loss of each copy's own decode (lower: more confident)


class _Rows:
    """Rows of one part of the batch, and what they decoded so far."""

    def __init__(self, count: int, eos_id: int, max_length: int, device: torch.device) -> None:
        self.count, self.eos_id, self.max_length = count, eos_id, max_length
        self.tokens: list[Tensor] = []  # per step [count]; -1 after the end of sequence
        self.done = torch.zeros(count, dtype=torch.bool, device=device)

    def record(self, chosen: Tensor) -> Tensor:
        """Store the step's tokens; returns which rows were still running before it."""
        running = ~self.done
        self.tokens.append(torch.where(running, chosen, -1))
        self.done |= chosen == self.eos_id
        return running

    def sequences(self) -> tuple[list[list[int]], list[bool]]:
        steps = torch.stack(self.tokens, dim=1).tolist() if self.tokens else [[] for _ in range(self.count)]
        out, finished = [], []
        for row in steps:
            seq = [t for t in row if t >= 0]
            ended = bool(seq) and seq[-1] == self.eos_id
            out.append(seq[:-1] if ended else seq[: self.max_length])  # the step past the limit only looks for the end
            finished.append(ended)
        return out, finished


def _greedy(log_probs: Tensor, allowed: Tensor | None) -> Tensor:
    """Argmax (the lowest id among exact ties), among the ``allowed`` tokens when given."""
    return (log_probs if allowed is None else log_probs.masked_fill(~allowed, float("-inf"))).argmax(-1)


@dataclass
class _Plan:
    """Which rows a batch decodes: blocks of |G| copies (free-running ones per distinct canonical
    command, lock-step ones per distinct (canonical command, method)), and one row per distinct
    vanilla command."""

    frames: list[int]  # per command: k with x = k·c
    keys: list[tuple[int, ...]]  # per command: its canonical copy c
    free: dict[tuple[int, ...], int]  # c -> block
    lock: dict[tuple[tuple[int, ...], Method], int]  # (c, method) -> entry; its block is n_free + entry
    plain: dict[tuple[int, ...], int]  # x -> plain row
    block_src: Tensor  # [J, L] the canonical command of each block
    plain_src: Tensor  # [P, L]

    @property
    def n_free(self) -> int:
        return len(self.free)

    @property
    def n_blocks(self) -> int:
        return len(self.free) + len(self.lock)


def _plan(
    group: SequenceGroup, commands: Sequence[Sequence[int]], methods: list[Method], pad_id: int, diagnostics: bool
) -> _Plan:
    width = max(len(c) for c in commands)

    def padded(rows: Sequence[Sequence[int]]) -> Tensor:
        out = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for b, row in enumerate(rows):
            out[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        return out

    canonical, frames = canonicalize(group.input, padded(commands))
    keys = [tuple(row) for row in canonical.tolist()]
    free: dict[tuple[int, ...], int] = {}
    lock: dict[tuple[tuple[int, ...], Method], int] = {}
    plain: dict[tuple[int, ...], int] = {}
    for b, method in enumerate(methods):
        if diagnostics or method is Method.EQUIZERO:
            free.setdefault(keys[b], len(free))
        if method in (Method.EQUITUNE, Method.LAMBDA):
            lock.setdefault((keys[b], method), len(lock))
        if method is Method.VANILLA:
            plain.setdefault(tuple(commands[b]), len(plain))
    block_src = torch.tensor([*free, *(key for key, _ in lock)], dtype=torch.long).view(-1, width)
    return _Plan(frames, keys, free, lock, plain, block_src, padded(list(plain)))


@torch.no_grad()
def decode(
    model: StepModel,
    group: SequenceGroup,
    commands: Sequence[Sequence[int]],
    methods: Sequence[Method | str],
    *,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    max_length: int,
    lambda_net: LambdaNet | None = None,
    zero_loss: ZeroLoss | str = ZeroLoss.NEG_MAX_PROB,
    mixture: Mixture | str = Mixture.LOG_MEAN_EXP,
    diagnostics: bool = True,
    device: torch.device | str = "cpu",
) -> list[Decoded]:
    """Translate ``commands`` (lists of input ids), each with its method, greedily, in ONE batch.

    Every step is one ``model.step`` on all rows: the |G| free-running copies of each distinct
    canonical command (equizero and the diagnostics), the |G| lock-step copies of each (canonical
    command, method) pair of equitune and λ, and one row per distinct vanilla command. At most
    ``max_length`` tokens before the end of sequence. ``diagnostics=False`` skips the free-running
    copies of commands that do not need them (no equizero): a cheaper evaluation.
    """
    methods = [Method(m) for m in methods]
    zero_loss, mixture = ZeroLoss(zero_loss), Mixture(mixture)
    if len(methods) != len(commands):
        raise ValueError("one method per command")
    if not commands:
        return []
    if any(len(c) == 0 for c in commands):
        raise ValueError("a command needs at least one token")
    if Method.LAMBDA in methods and lambda_net is None:
        raise ValueError("the lambda method needs a λ-net")
    device = torch.device(device)
    plan = _plan(group, commands, methods, pad_id, diagnostics)
    n, n_free, n_blocks = group.order, plan.n_free, plan.n_blocks
    copies_src = group.input.expand(plan.block_src)  # [n*J, L]: row g*J + j = g·c_j
    state, features = model.begin(torch.cat([copies_src, plan.plain_src]).to(device))
    n_copy_rows = n * n_blocks
    log_lambda = None
    if lambda_net is not None and n_blocks:
        log_lambda = lambda_net(features[:n_copy_rows]).view(n, n_blocks).float()
    free_allowed = fixed_tokens(group.output, stabilizer(group.input, copies_src)).to(device)  # per copy row
    lock_allowed = fixed_tokens(group.output, stabilizer(group.input, plan.block_src)).to(device)  # Stab(c)
    locked = list(plan.lock.items())  # ((block, method), j): the lock-step rows, by the method they combine with
    lock_subsets: dict[Method, Tensor] = {
        method: torch.tensor([n_free + locked[i][1] for i in rows], device=device)
        for method, rows in group_rows([method for (_, method), _ in locked]).items()
    }

    rows_copies, rows_lock, rows_plain = (
        _Rows(count, eos_id, max_length, device) for count in (n_copy_rows, len(plan.lock), len(plan.plain))
    )
    lock_weights = torch.zeros(n, n_blocks, device=device)
    loss_sum = torch.zeros(n_copy_rows, device=device)
    loss_steps = torch.zeros(n_copy_rows, device=device)
    is_lock_block = torch.arange(n_blocks, device=device) >= n_free
    tokens = torch.full((n_copy_rows + len(plan.plain),), bos_id, dtype=torch.long, device=device)
    for _ in range(max_length + 1):
        log_probs, state = model.step(tokens, state)
        feed = torch.full_like(tokens, eos_id)
        # Free-running copies: each its own greedy choice (among its stabiliser's fixed tokens).
        copy_lp = log_probs[:n_copy_rows]
        chosen = _greedy(copy_lp, free_allowed)
        running = rows_copies.record(chosen)
        step_loss = (
            -copy_lp.gather(1, chosen.unsqueeze(1)).squeeze(1).exp()
            if zero_loss is ZeroLoss.NEG_MAX_PROB
            else -(copy_lp.exp() * copy_lp).nan_to_num().sum(-1)
        )
        loss_sum += torch.where(running, step_loss.float(), 0.0)
        loss_steps += running.float()
        feed[:n_copy_rows] = chosen
        # Lock-step copies: align, combine, choose in the canonical frame, feed g·y to copy g.
        if plan.lock:
            aligned = group.output.invert_scores(copy_lp.view(n, n_blocks, -1))
            choice = torch.full((n_blocks,), eos_id, dtype=torch.long, device=device)
            for method, cols in lock_subsets.items():
                combined = combine(
                    aligned.index_select(1, cols),
                    method,
                    log_lambda=log_lambda.index_select(1, cols) if log_lambda is not None else None,
                    mixture=mixture,
                )
                choice[cols] = _greedy(combined.output, lock_allowed.index_select(0, cols))
                lock_weights[:, cols] = combined.weights.to(lock_weights.dtype)
            rows_lock.record(choice[n_free:])
            relabelled = group.output.expand(choice).view(n, n_blocks)  # g·y for copy g
            feed[:n_copy_rows] = torch.where(is_lock_block, relabelled, chosen.view(n, n_blocks)).reshape(-1)
        if plan.plain:
            plain_choice = _greedy(log_probs[n_copy_rows:], None)
            rows_plain.record(plain_choice)
            feed[n_copy_rows:] = plain_choice
        free_done = rows_copies.done.view(n, n_blocks)[:, :n_free]
        if bool(free_done.all()) and bool(rows_lock.done.all()) and bool(rows_plain.done.all()):
            break
        tokens = feed

    entropies = lambda_entropy(torch.softmax(log_lambda, dim=0)).cpu().tolist() if log_lambda is not None else None
    outputs = _Outputs(
        *rows_copies.sequences(),
        *rows_lock.sequences(),
        *rows_plain.sequences(),
        losses=(loss_sum / loss_steps.clamp_min(1)).view(n, n_blocks).cpu(),
        lock_weights=lock_weights.cpu(),
        entropies=entropies,
    )
    return [_answer(group, plan, outputs, b, method, commands[b]) for b, method in enumerate(methods)]


@dataclass(frozen=True)
class _Outputs:
    """What a batch decoded, in the canonical frames (copy rows: g*J + j)."""

    copy_seqs: list[list[int]]
    copy_finished: list[bool]
    lock_seqs: list[list[int]]
    lock_finished: list[bool]
    plain_seqs: list[list[int]]
    plain_finished: list[bool]
    losses: Tensor  # [n, J] equizero's loss of each free-running copy
    lock_weights: Tensor  # [n, J] the copies' weights of each lock-step block
    entropies: list[float] | None  # per block


def _answer(
    group: SequenceGroup, plan: _Plan, out: _Outputs, b: int, method: Method, command: Sequence[int]
) -> Decoded:
    """Command ``b``'s answer in its own frame: ``k·`` the canonical one; copy g of x is copy g·k of c."""
    n, n_blocks, k = group.order, plan.n_blocks, plan.frames[b]
    into_c = [group.compose(g, k) for g in range(n)]
    j_free, j_lock = plan.free.get(plan.keys[b]), plan.lock.get((plan.keys[b], method))
    copies = finished_copies = copy_losses = None
    if j_free is not None:
        rows = [gk * n_blocks + j_free for gk in into_c]
        copies = [group.act_output(out.copy_seqs[r], group.inverse(g)) for g, r in enumerate(rows)]
        finished_copies = [out.copy_finished[r] for r in rows]
        copy_losses = [float(out.losses[gk, j_free]) for gk in into_c]
    selected = None
    if method is Method.VANILLA:
        p = plan.plain[tuple(command)]
        answer, finished = out.plain_seqs[p], out.plain_finished[p]
        weights = [1.0] + [0.0] * (n - 1)
    elif method is Method.EQUIZERO:
        assert j_free is not None
        w_c, sel = equizero_weights(out.losses[:, j_free : j_free + 1])
        best = int(sel[0])
        row = best * n_blocks + j_free
        answer = group.act_output(group.act_output(out.copy_seqs[row], group.inverse(best)), k)
        finished = out.copy_finished[row]
        weights = [float(w_c[gk, 0]) for gk in into_c]
        selected = group.compose(best, group.inverse(k))
    else:
        assert j_lock is not None
        answer, finished = group.act_output(out.lock_seqs[j_lock], k), out.lock_finished[j_lock]
        weights = [float(out.lock_weights[gk, plan.n_free + j_lock]) for gk in into_c]
    block = j_free if j_free is not None else (plan.n_free + j_lock if j_lock is not None else None)
    entropy = out.entropies[block] if out.entropies is not None and block is not None else None
    return Decoded(answer, finished, weights, selected, entropy, copies, finished_copies, copy_losses)

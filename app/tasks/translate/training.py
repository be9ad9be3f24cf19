"""SCAN training: the non-equivariant seq2seq models, their fine-tuning with a method, and their accuracy.

* ``pretrain``: a GRU/LSTM seq2seq (``app.tasks.translate.seq2seq``) on a split's training pairs,
  mini-batched, teacher forced, Adam; every ``eval_every`` steps the exact-match accuracy on a held-out
  part of the training split (the same commands for every seed) picks the best checkpoint.
* ``finetune``: from a pretrained model, ``steps`` steps of a method over a group, teacher forced with
  every copy fed its own relabelled gold prefix (``teacher_forced_copies``): equitune (mean of the
  copies), equizero (straight-through: forward the copy of least loss per sequence, backward equitune,
  as the paper), λ-equitune (λ-net on each copy's encoder features, trained with the model, or alone with
  ``freeze_model``: the "zero-shot" λ-net of a frozen model), or vanilla (plain training, the control).
* ``accuracy``: exact-match sequence accuracy with the served decoder (``app.equivariance.sequence.decode``).
"""

from __future__ import annotations

import copy
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from app.equivariance.groups import PermutationGroup
from app.equivariance.lambda_net import LambdaNet
from app.equivariance.methods import Method, Mixture, ZeroLoss, combine, equizero_loss, equizero_weights
from app.equivariance.model import Copies
from app.equivariance.sequence import SequenceGroup, teacher_forced_copies
from app.tasks.translate.groups import scan_group
from app.tasks.translate.model import decode_commands
from app.tasks.translate.scan import Pair, split
from app.tasks.translate.seq2seq import Cell, Seq2Seq, Seq2SeqConfig, state_dict_config
from app.tasks.translate.vocab import ACTION_EOS, ACTION_PAD, ACTION_SOS, ACTIONS_VOCAB, COMMAND_PAD, COMMANDS

HELD_OUT_SEED = 0  # the held-out commands are the same for every training seed
MAX_ACTIONS = 64  # decoding limit in evaluation (SCAN's longest action sequence is 48)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    src: Tensor  # [B, L] command ids, right-padded
    tgt_in: Tensor  # [B, T] start token, then the actions
    tgt_out: Tensor  # [B, T] the actions, then the end of sequence; padding elsewhere


def encode_pairs(pairs: Sequence[Pair]) -> Batch:
    src = [COMMANDS.encode(c.split()) for c, _ in pairs]
    tgt = [ACTIONS_VOCAB.encode(a.split()) for _, a in pairs]
    width, length = max(map(len, src)), max(map(len, tgt)) + 1
    s = torch.full((len(pairs), width), COMMAND_PAD, dtype=torch.long)
    t_in = torch.full((len(pairs), length), ACTION_PAD, dtype=torch.long)
    t_out = torch.full((len(pairs), length), ACTION_PAD, dtype=torch.long)
    for i, (c, a) in enumerate(zip(src, tgt, strict=True)):
        s[i, : len(c)] = torch.tensor(c)
        t_in[i, : len(a) + 1] = torch.tensor([ACTION_SOS, *a])
        t_out[i, : len(a) + 1] = torch.tensor([*a, ACTION_EOS])
    return Batch(s, t_in, t_out)


def held_out_split(name: str, fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) of split ``name``: ``fraction`` of its distinct commands held out.

    Commands the split repeats (Add Jump's bare ``jump``, its only example of the primitive) stay in
    training with all their copies.
    """
    train = list(split(name).train)
    counts = Counter(command for command, _ in train)
    candidates = sorted(c for c, n in counts.items() if n == 1)
    held = set(random.Random(HELD_OUT_SEED).sample(candidates, round(fraction * len(candidates))))
    return [p for p in train if p[0] not in held], [p for p in train if p[0] in held]


# ---------------------------------------------------------------------------------------
# Losses and accuracy
# ---------------------------------------------------------------------------------------


def uniform_lambda_net(feature_dim: int) -> LambdaNet:
    """A trainable λ-net that starts as equitune (its last layer zero: every copy the same weight)."""
    net = LambdaNet(feature_dim)
    with torch.no_grad():
        net.mlp[-1].weight.zero_()
        net.mlp[-1].bias.zero_()
    return net


class CopyLoss(str, Enum):
    """How a fine-tuning loss reads the aligned copies ``log p_g = g⁻¹·log p(·| g·x, g·y_<t)`` of a step.

    * ``mean_log_prob`` (the paper's code): the NLL of ``Σ_g w_g log p_g``, not renormalised: for
      equitune the mean of the copies' own NLLs. Equizero is straight-through on it (forward the
      selected copy, backward the mean), and as the NLL is linear in its input, equizero's gradient
      is then equitune's exactly: the two fine-tune to the same weights, step for step; only the
      checkpoint that each one's held-out accuracy selects can differ.
    * ``log_mean_exp``: the NLL of the mixture ``log Σ_g w_g p_g`` (what the server decodes with);
      equizero straight-through on it, so again equitune's gradient.
    * ``selected_copy`` (equizero only): the NLL of the selected copy ``g*`` alone, so the gradient
      reaches ``g*`` and no other copy: fine-tuning what equizero answers with.
    """

    MEAN_LOG_PROB = "mean_log_prob"
    LOG_MEAN_EXP = "log_mean_exp"
    SELECTED_COPY = "selected_copy"


@dataclass(frozen=True)
class Objective:
    """What one training step optimises, beside the method."""

    copy_loss: CopyLoss = CopyLoss.LOG_MEAN_EXP
    zero_loss: ZeroLoss = ZeroLoss.NEG_MAX_PROB
    free_running: bool = False  # copies fed their own greedy tokens instead of the gold prefix
    augment: bool = False  # vanilla only: each pair replaced by g·x -> g·y for a random g (group augmentation)
    # The paper's loop: sum the NLL over the positions up to the first one whose combined argmax is the
    # end of sequence (the rest of the target is not scored), per sequence.
    stop_at_predicted_eos: bool = False
    token_sum: bool = False  # sum over a sequence's positions (the paper's); else the mean over all tokens


def free_running(model: Seq2Seq, src: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Log-probabilities ``[R, length, V]`` of each row decoding greedily on its own (no gold prefix), as
    the paper trains without teacher forcing, and the rows' features. After a row emits the end of
    sequence its positions are zero, as in the paper's decoder output buffer."""
    state, features = model.begin(src)
    tokens = torch.full((src.shape[0],), ACTION_SOS, dtype=torch.long, device=src.device)
    ended = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    steps = []
    for _ in range(length):
        log_probs, state = model.step(tokens, state)
        steps.append(log_probs.masked_fill(ended.unsqueeze(1), 0.0))
        tokens = log_probs.argmax(-1).detach()
        ended = ended | (tokens == ACTION_EOS)
    return torch.stack(steps, 1), features


def free_running_copies(
    model: Seq2Seq, group: SequenceGroup, src: Tensor, length: int, lambda_net: LambdaNet | None = None
) -> Copies:
    """``teacher_forced_copies`` without the gold prefix: copy ``g`` reads ``g·x`` and is fed its own argmax
    in its own frame (``free_running``); ``aligned`` ``[n, B, length, V]``."""
    n, batch = group.order, src.shape[0]
    log_probs, features = free_running(model, group.input.expand(src), length)
    aligned = group.output.invert_scores(log_probs.view(n, batch, length, -1))
    log_lambda = lambda_net(features).view(n, batch) if lambda_net is not None else None
    return Copies(features.view(n, batch, -1), log_lambda, aligned)


def _augmented(group: SequenceGroup, batch: Batch, generator: torch.Generator | None) -> Batch:
    """``batch`` with each pair replaced by its copy under a uniformly random element (the identity included)."""
    n, rows = group.order, batch.src.shape[0]
    pick = torch.randint(n, (rows,), generator=generator)
    index = torch.arange(rows)

    def act(ids: Tensor, on: PermutationGroup) -> Tensor:
        return on.expand(ids).view(n, rows, *ids.shape[1:])[pick, index]

    # Padding and the start/end tokens are fixed by every element, so they stay where they are.
    return Batch(act(batch.src, group.input), act(batch.tgt_in, group.output), act(batch.tgt_out, group.output))


def _scored_positions(log_probs: Tensor, tgt_out: Tensor, stop_at_predicted_eos: bool) -> Tensor:
    """``[B, T]`` True where a position counts in the loss."""
    scored = tgt_out != ACTION_PAD
    if stop_at_predicted_eos:
        predicted_eos = log_probs.detach().argmax(-1) == ACTION_EOS
        # a position counts if no earlier position predicted the end of sequence
        before = torch.cumsum(predicted_eos.long(), dim=1) - predicted_eos.long()
        scored = scored & (before == 0)
    return scored


def method_loss(
    model: Seq2Seq,
    group: SequenceGroup,
    batch: Batch,
    method: Method,
    lambda_net: LambdaNet | None = None,
    objective: Objective | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Token NLL of the gold actions under ``method``'s combination of the copies (``objective``: how)."""
    objective = objective or Objective()
    if objective.augment and method is not Method.VANILLA:
        raise ValueError("group augmentation trains the plain model: it needs method vanilla")
    if objective.copy_loss is CopyLoss.SELECTED_COPY and method is not Method.EQUIZERO:
        raise ValueError("the selected-copy loss is equizero's")
    length = batch.tgt_out.shape[1]
    if method is Method.VANILLA:
        if objective.augment:
            batch = _augmented(group, batch, generator)
        if objective.free_running:
            log_probs, _ = free_running(model, batch.src, length)
        else:
            log_probs, _ = model.teacher_forced(batch.src, batch.tgt_in)
    else:
        if objective.free_running:
            copies = free_running_copies(model, group, batch.src, length, lambda_net)
        else:
            copies = teacher_forced_copies(model, group, batch.src, batch.tgt_in, lambda_net)
        aligned, log_lambda = copies.aligned, copies.log_lambda
        # Padding positions get the same (uniform) scores in every copy, so equizero's per-sequence
        # choice is made on the real positions only.
        pad = (batch.tgt_out == ACTION_PAD).view(1, *batch.tgt_out.shape, 1)
        aligned = aligned.masked_fill(pad, 0.0)
        if objective.copy_loss is CopyLoss.SELECTED_COPY:
            with torch.no_grad():
                _, selected = equizero_weights(equizero_loss(aligned, objective.zero_loss))
            log_probs = aligned[selected, torch.arange(aligned.shape[1])]
        else:
            mixture = Mixture.LOG_MEAN_EXP if objective.copy_loss is CopyLoss.LOG_MEAN_EXP else Mixture.MEAN
            combined = combine(
                aligned,
                method,
                log_lambda=log_lambda,
                zero_loss=objective.zero_loss,
                straight_through=True,
                mixture=mixture,
            )
            log_probs = combined.output
    scored = _scored_positions(log_probs, batch.tgt_out, objective.stop_at_predicted_eos)
    target = batch.tgt_out.masked_fill(~scored, ACTION_PAD)
    nll = F.nll_loss(log_probs.flatten(0, 1), target.flatten(), ignore_index=ACTION_PAD, reduction="sum")
    if objective.token_sum:
        return nll / batch.src.shape[0]
    return nll / scored.sum().clamp_min(1)


@torch.no_grad()
def translate(
    model: Seq2Seq,
    group: SequenceGroup,
    commands: Sequence[str],
    method: Method | str,
    *,
    lambda_net: LambdaNet | None = None,
    mixture: Mixture = Mixture.LOG_MEAN_EXP,
    zero_loss: ZeroLoss = ZeroLoss.NEG_MAX_PROB,
    batch_size: int = 256,
    max_length: int = MAX_ACTIONS,
) -> list[str]:
    """Action strings of ``commands`` under ``method`` (the served decoder, no diagnostics)."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(commands), batch_size):
        chunk = [COMMANDS.encode(c.split()) for c in commands[start : start + batch_size]]
        decoded = decode_commands(
            model,
            group,
            chunk,
            [method] * len(chunk),
            max_length=max_length,
            lambda_net=lambda_net,
            zero_loss=zero_loss,
            mixture=mixture,
            diagnostics=False,
        )
        out.extend(" ".join(ACTIONS_VOCAB.decode(d.tokens)) if d.finished else "<unfinished>" for d in decoded)
    model.train(was_training)
    return out


def accuracy(model: Seq2Seq, group: SequenceGroup, pairs: Sequence[Pair], method: Method | str, **kwargs: Any) -> float:
    """Exact-match accuracy (the whole action sequence, ended within the limit) on distinct ``pairs``."""
    distinct = sorted(set(pairs))
    if not distinct:
        return 0.0
    predicted = translate(model, group, [c for c, _ in distinct], method, **kwargs)
    return sum(p == a for p, (_, a) in zip(predicted, distinct, strict=True)) / len(distinct)


# ---------------------------------------------------------------------------------------
# Training loops
# ---------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# Commands of at most SHORT_WORDS words are a few dozen of a split's thousands (Add Jump: 68 of 13,000):
# seen a handful of times per run, the model learns that a verb is followed by more actions and
# answers `walk twice` with four walks. Every copy of a short command is short too, so no method
# can make up for it; repeating them in each epoch can.
SHORT_WORDS = 3
SHORT_REPEATS = 20


def oversample_short(pairs: Sequence[Pair], short_words: int, copies: int) -> list[Pair]:
    """``pairs``, with each distinct command of at most ``short_words`` words repeated to ``copies`` copies.

    Commands a split already repeats more (Add Jump's bare ``jump``) keep their count.
    """
    counts = Counter(pairs)
    extra = [
        pair for pair, n in counts.items() if len(pair[0].split()) <= short_words for _ in range(max(0, copies - n))
    ]
    return [*pairs, *extra]


def _batches(pairs: Sequence[Pair], batch_size: int, rng: random.Random):
    order = list(range(len(pairs)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield encode_pairs([pairs[i] for i in order[start : start + batch_size]])


@dataclass(frozen=True)
class PretrainConfig:
    split: str = "add_jump"
    cell: Cell = "gru"
    seed: int = 0
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 2e-3
    hidden: int = 64
    dropout: float = 0.1
    held_out: float = 0.1
    eval_every: int = 500
    clip: float = 5.0
    short_words: int = SHORT_WORDS
    short_repeats: int = SHORT_REPEATS


@dataclass
class TrainResult:
    model: Seq2Seq
    held_out_accuracy: float
    best_step: int
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)
    lambda_net: LambdaNet | None = None


def pretrain(config: PretrainConfig, *, progress: bool = True) -> TrainResult:
    """Train a seq2seq on ``config.split``'s training part; the checkpoint with the best held-out accuracy."""
    seed_everything(config.seed)
    train_pairs, held = held_out_split(config.split, config.held_out)
    model = Seq2Seq(Seq2SeqConfig(cell=config.cell, hidden=config.hidden, dropout=config.dropout))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    # Cosine decay to zero: the last checkpoints are calm, so "best held-out" is not a lucky step.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    group = scan_group("verb")  # unused by vanilla; decode needs a group
    training = oversample_short(train_pairs, config.short_words, config.short_repeats)
    batches = _batches(training, config.batch_size, random.Random(config.seed))
    best, best_acc, best_step, curve = copy.deepcopy(model.state_dict()), -1.0, 0, []
    started = time.perf_counter()
    bar = tqdm(
        range(1, config.steps + 1), desc=f"{config.split} {config.cell} seed {config.seed}", disable=not progress
    )
    for step in bar:
        model.train()
        loss = method_loss(model, group, next(batches), Method.VANILLA)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        schedule.step()
        if step % config.eval_every == 0 or step == config.steps:
            acc = accuracy(model, group, held, Method.VANILLA)
            curve.append({"step": step, "loss": float(loss.detach()), "held_out_accuracy": acc})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", held_out=f"{acc:.3f}")
            if acc > best_acc:
                best, best_acc, best_step = copy.deepcopy(model.state_dict()), acc, step
    model.load_state_dict(best)
    return TrainResult(model.eval(), best_acc, best_step, time.perf_counter() - started, curve)


@dataclass(frozen=True)
class FinetuneConfig:
    method: Method
    group: str
    split: str = "add_jump"
    seed: int = 0
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-4
    lambda_learning_rate: float = 1e-3
    weight_decay: float = 0.0  # Adam's L2 term (the paper's 1e-4), not decoupled
    freeze_model: bool = False  # λ-equitune: train the λ-net alone (the frozen model's zero-shot λ)
    held_out: float = 0.1
    clip: float = 5.0
    copy_loss: CopyLoss = CopyLoss.LOG_MEAN_EXP  # the training objective's reading of the copies
    teacher_forcing: float = 1.0  # probability that a step feeds the gold prefix (else free running)
    stop_at_predicted_eos: bool = False
    token_sum: bool = False
    augment: bool = False  # vanilla on group-augmented pairs (the control for fine-tuning on g·x)
    # 0: keep the model after the last step; n: every n steps (and the last) the held-out accuracy
    # under the method picks the checkpoint, as the paper's early stopping does.
    eval_every: int = 0
    curve_steps: tuple[int, ...] = ()  # steps at which the curve sets are evaluated too
    mixture: Mixture = Mixture.LOG_MEAN_EXP  # decoding (evaluation), as the server does
    zero_loss: ZeroLoss = ZeroLoss.NEG_MAX_PROB
    short_words: int = SHORT_WORDS
    short_repeats: int = SHORT_REPEATS

    def objective(self, free_running: bool) -> Objective:
        return Objective(
            self.copy_loss, self.zero_loss, free_running, self.augment, self.stop_at_predicted_eos, self.token_sum
        )


# The paper's fine-tuning (``EquiZeroSCAN/equizero_scan.py`` of the official code): 10,000 single
# pairs drawn at random, Adam with L2 1e-4, teacher forcing on half of the steps, the NLL summed up
# to the first predicted end of sequence, per-copy log-probabilities averaged, early stopping on
# held-out accuracy. Its learning rate is per split.
PAPER_LEARNING_RATES = {"add_jump": 5e-5, "around_right": 2e-5}
PAPER_RECIPE: dict[str, Any] = {
    "steps": 10_000,
    "batch_size": 1,
    "weight_decay": 1e-4,
    "copy_loss": CopyLoss.MEAN_LOG_PROB,
    "teacher_forcing": 0.5,
    "stop_at_predicted_eos": True,
    "token_sum": True,
    "eval_every": 100,
}
# Ours until issue 26: mini-batches of 32, the mixture's NLL, no early stopping.
MIXTURE_RECIPE: dict[str, Any] = {"steps": 300, "batch_size": 32, "learning_rate": 1e-4}


def recipe(name: str, method: Method, group: str, split: str, seed: int, **overrides: Any) -> FinetuneConfig:
    """The named fine-tuning recipe: ``paper``, ``selected`` (the paper's, but equizero trains on its selected
    copy's NLL; the other methods as the paper), ``mixture`` (ours before issue 26), or ``augmented`` (the
    paper's schedule, vanilla on group-augmented pairs)."""
    paper = {**PAPER_RECIPE, "learning_rate": PAPER_LEARNING_RATES.get(split, 5e-5)}
    selected = {**paper, "copy_loss": CopyLoss.SELECTED_COPY} if method is Method.EQUIZERO else paper
    options: dict[str, Any] = {
        "paper": paper,
        "selected": selected,
        "augmented": {**paper, "augment": True},
        "mixture": MIXTURE_RECIPE,
    }[name]
    return FinetuneConfig(method, group, split, seed, **{**options, **overrides})


def finetune(
    pretrained: Seq2Seq,
    config: FinetuneConfig,
    *,
    progress: bool = True,
    evaluate: bool = True,
    curve_sets: dict[str, Sequence[Pair]] | None = None,
) -> TrainResult:
    """``config.steps`` steps of ``config.method`` from a copy of ``pretrained``: the model after the last step,
    or with ``eval_every`` the checkpoint of best held-out accuracy under the method (its held-out accuracy,
    NaN when not ``evaluate`` and nothing selected). ``curve_sets`` (name -> pairs) are evaluated at
    ``curve_steps``, into the curve."""
    seed_everything(config.seed)
    if config.freeze_model and config.method is not Method.LAMBDA:
        raise ValueError("freeze_model trains the λ-net alone: it needs method lambda")
    group = scan_group(config.group)
    model = copy.deepcopy(pretrained).train()
    lambda_net = uniform_lambda_net(model.feature_dim) if config.method is Method.LAMBDA else None
    params: list[dict[str, Any]] = []
    if not config.freeze_model:
        params.append({"params": list(model.parameters()), "lr": config.learning_rate})
    else:
        model.requires_grad_(False)
        model.eval()  # a frozen model: no dropout either, as it will be served
    if lambda_net is not None:
        params.append({"params": list(lambda_net.parameters()), "lr": config.lambda_learning_rate})
    optimizer = torch.optim.Adam(params, weight_decay=config.weight_decay)
    train_pairs, held = held_out_split(config.split, config.held_out)
    training = oversample_short(train_pairs, config.short_words, config.short_repeats)
    batches = _batches(training, config.batch_size, random.Random(config.seed))
    forcing = random.Random(config.seed + 1)  # its own stream: the same draws for every method
    augmenting = torch.Generator().manual_seed(config.seed + 2)
    trained = [p for g in params for p in g["params"]]
    kwargs = {"lambda_net": lambda_net, "mixture": config.mixture, "zero_loss": config.zero_loss}

    def held_out_accuracy() -> float:
        acc = accuracy(model, group, held, config.method, **kwargs)
        model.train(not config.freeze_model)
        return acc

    started = time.perf_counter()
    desc = f"{config.split} {model.config.cell} {config.method.value}{' (λ only)' if config.freeze_model else ''}"
    best: tuple[float, int, dict[str, Tensor], dict[str, Tensor] | None] | None = None
    curve: list[dict[str, float]] = []
    losses: list[float] = []
    for step in tqdm(range(1, config.steps + 1), desc=desc, disable=not progress):
        objective = config.objective(free_running=forcing.random() >= config.teacher_forcing)
        loss = method_loss(model, group, next(batches), config.method, lambda_net, objective, augmenting)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, config.clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        selecting = config.eval_every and (step % config.eval_every == 0 or step == config.steps)
        if not (selecting or step in config.curve_steps):
            continue
        point: dict[str, float] = {"step": step, "loss": sum(losses) / len(losses)}
        losses.clear()
        point["held_out_accuracy"] = held_out_accuracy()
        if step in config.curve_steps:
            for name, pairs in (curve_sets or {}).items():
                point[f"{name}_accuracy"] = accuracy(model, group, pairs, config.method, **kwargs)
            model.train(not config.freeze_model)
        curve.append(point)
        if selecting and (best is None or point["held_out_accuracy"] > best[0]):
            lam_state = copy.deepcopy(lambda_net.state_dict()) if lambda_net is not None else None
            best = (point["held_out_accuracy"], step, copy.deepcopy(model.state_dict()), lam_state)
    if best is not None:
        model.load_state_dict(best[2])
        if lambda_net is not None and best[3] is not None:
            lambda_net.load_state_dict(best[3])
    model.eval()
    if lambda_net is not None:
        lambda_net.eval()
    if best is not None:
        acc, best_step = best[0], best[1]
    else:
        acc = accuracy(model, group, held, config.method, **kwargs) if evaluate else float("nan")
        best_step = config.steps
    return TrainResult(model, acc, best_step, time.perf_counter() - started, curve, lambda_net)


# ---------------------------------------------------------------------------------------
# Export: models/<name>/
# ---------------------------------------------------------------------------------------

SPLIT_NAMES = {"add_jump": "addjump", "around_right": "aroundright"}


def export_model(
    folder: Path,
    model: Seq2Seq,
    *,
    group: str,
    split_name: str,
    description: str,
    lambda_net: LambdaNet | None = None,
    default_method: Method = Method.EQUIZERO,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/model.yaml`` + ``seq2seq.safetensors`` (+ ``lambda_net.safetensors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_module(model, folder / "seq2seq.safetensors")
    spec: dict[str, Any] = {
        "task": "translate",
        "description": description,
        "split": split_name,
        "backbone": {
            "family": "seq2seq",
            "options": {
                "cell": model.config.cell,
                "hidden": model.config.hidden,
                "bidirectional": model.config.bidirectional,
            },
        },
        "weights": "seq2seq.safetensors",
        "group": group,
        "methods": [m.value for m in Method],
        "default_method": default_method.value,
    }
    if lambda_net is not None:
        save_module(lambda_net, folder / "lambda_net.safetensors")
        spec["lambda_net"] = "lambda_net.safetensors"
    if training is not None:
        spec["training"] = training
    (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return folder


def save_module(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def load_seq2seq(path: Path, cell: Cell) -> Seq2Seq:
    """A seq2seq that ``save_module`` wrote (its sizes read from the weights), in eval mode."""
    state = load_file(str(path))
    model = Seq2Seq(state_dict_config(state, cell))
    model.load_state_dict(state)
    return model.eval()


def config_dict(config: PretrainConfig | FinetuneConfig) -> dict[str, Any]:
    return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(config).items()}


LAMBDA_STEPS = 200  # λ-net steps on a frozen model (the zero-shot λ of the shipped entries)


def train_zero_shot_lambda(
    result: TrainResult,
    config: PretrainConfig,
    group: str,
    steps: int = LAMBDA_STEPS,
    *,
    progress: bool = True,
    evaluate: bool = True,
) -> TrainResult:
    """A λ-net trained on ``result``'s frozen model over ``group`` (the seq2seq weights stay as they are)."""
    lambda_config = FinetuneConfig(
        Method.LAMBDA,
        group,
        config.split,
        config.seed,
        steps,
        held_out=config.held_out,
        freeze_model=True,
        short_words=config.short_words,
        short_repeats=config.short_repeats,
    )
    return finetune(result.model, lambda_config, progress=progress, evaluate=evaluate)


Run = tuple[PretrainConfig, TrainResult]
ZeroShotLambda = tuple[LambdaNet, dict[str, Any]]  # a λ-net trained on the frozen model, and how


def best_run(runs: Sequence[Run]) -> Run:
    """The run with the best held-out accuracy (the first among ties)."""
    return max(runs, key=lambda run: run[1].held_out_accuracy)


def zero_shot_lambda(
    result: TrainResult, config: PretrainConfig, group: str, steps: int, *, progress: bool
) -> ZeroShotLambda:
    lam = train_zero_shot_lambda(result, config, group, steps, progress=progress)
    assert lam.lambda_net is not None
    return lam.lambda_net, {"steps": steps, "held_out_accuracy": round(lam.held_out_accuracy, 4)}


def ship(runs: Sequence[Run], lambda_nets: dict[str, ZeroShotLambda | None], models_dir: Path, name: str) -> list[Path]:
    """Write the best of ``runs`` as one entry per group of ``lambda_nets`` (group -> its zero-shot λ-net,
    or None for a uniform λ): ``name`` for the first group, ``name-<group>`` for the others."""
    config, best = best_run(runs)
    folders = []
    for i, (group, lam) in enumerate(lambda_nets.items()):
        training: dict[str, Any] = {
            "pretrain": config_dict(config),
            "held_out_accuracy": round(best.held_out_accuracy, 4),
            "best_step": best.best_step,
            "seconds": round(best.seconds, 1),
            "seeds": {c.seed: round(r.held_out_accuracy, 4) for c, r in runs},
        }
        if lam is not None:
            training["lambda_net"] = lam[1]
        folders.append(
            export_model(
                models_dir / (name if i == 0 else f"{name}-{group.replace('+', '-')}"),
                best.model,
                group=group,
                split_name=config.split,
                description=f"SCAN {config.split} {config.cell.upper()} seq2seq, seed {config.seed}, group {group}",
                lambda_net=lam[0] if lam is not None else None,
                training=training,
            )
        )
    return folders


def ship_best(
    configs: Sequence[PretrainConfig],
    groups: Sequence[str],
    models_dir: Path,
    name: str,
    *,
    lambda_steps: int = LAMBDA_STEPS,
    progress: bool = True,
) -> list[Path]:
    """Pretrain each config (one per seed), then ``ship`` the best with a zero-shot λ-net per group."""
    runs = [(config, pretrain(config, progress=progress)) for config in configs]
    config, best = best_run(runs)
    lambda_nets = {
        group: zero_shot_lambda(best, config, group, lambda_steps, progress=progress) if lambda_steps else None
        for group in groups
    }
    return ship(runs, lambda_nets, models_dir, name)

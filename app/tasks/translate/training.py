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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from app.equivariance.lambda_net import LambdaNet
from app.equivariance.methods import Method, Mixture, ZeroLoss, combine
from app.equivariance.sequence import SequenceGroup, teacher_forced_copies
from app.tasks.translate.groups import scan_group
from app.tasks.translate.model import decode_commands
from app.tasks.translate.scan import Pair, split
from app.tasks.translate.seq2seq import Cell, Seq2Seq, Seq2SeqConfig
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


def method_loss(
    model: Seq2Seq,
    group: SequenceGroup,
    batch: Batch,
    method: Method,
    lambda_net: LambdaNet | None = None,
    mixture: Mixture = Mixture.LOG_MEAN_EXP,
    zero_loss: ZeroLoss = ZeroLoss.NEG_MAX_PROB,
) -> Tensor:
    """Mean token NLL of the gold actions under ``method``'s combination of the teacher-forced copies."""
    if method is Method.VANILLA:
        log_probs, _ = model.teacher_forced(batch.src, batch.tgt_in)
    else:
        copies = teacher_forced_copies(model, group, batch.src, batch.tgt_in, lambda_net)
        # Padding positions get the same (uniform) scores in every copy, so equizero's per-sequence
        # choice is made on the real positions only.
        pad = (batch.tgt_out == ACTION_PAD).view(1, *batch.tgt_out.shape, 1)
        aligned = copies.aligned.masked_fill(pad, 0.0)
        combined = combine(
            aligned, method, log_lambda=copies.log_lambda, zero_loss=zero_loss, straight_through=True, mixture=mixture
        )
        log_probs = combined.output if mixture is Mixture.LOG_MEAN_EXP else torch.log_softmax(combined.output, -1)
    return F.nll_loss(log_probs.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=ACTION_PAD)


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
    freeze_model: bool = False  # λ-equitune: train the λ-net alone (the frozen model's zero-shot λ)
    held_out: float = 0.1
    clip: float = 5.0
    mixture: Mixture = Mixture.LOG_MEAN_EXP
    zero_loss: ZeroLoss = ZeroLoss.NEG_MAX_PROB
    short_words: int = SHORT_WORDS
    short_repeats: int = SHORT_REPEATS


def finetune(
    pretrained: Seq2Seq, config: FinetuneConfig, *, progress: bool = True, evaluate: bool = True
) -> TrainResult:
    """``config.steps`` steps of ``config.method`` from a copy of ``pretrained``; the model after the last step
    (with its held-out accuracy under the method, unless not ``evaluate``: then NaN)."""
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
    optimizer = torch.optim.Adam(params)
    train_pairs, held = held_out_split(config.split, config.held_out)
    training = oversample_short(train_pairs, config.short_words, config.short_repeats)
    batches = _batches(training, config.batch_size, random.Random(config.seed))
    started = time.perf_counter()
    desc = f"{config.split} {model.config.cell} {config.method.value}{' (λ only)' if config.freeze_model else ''}"
    for _ in tqdm(range(config.steps), desc=desc, disable=not progress):
        loss = method_loss(model, group, next(batches), config.method, lambda_net, config.mixture, config.zero_loss)
        optimizer.zero_grad()
        loss.backward()
        trained = [p for g in params for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(trained, config.clip)
        optimizer.step()
    model.eval()
    if lambda_net is not None:
        lambda_net.eval()
    kwargs = {"lambda_net": lambda_net, "mixture": config.mixture, "zero_loss": config.zero_loss}
    acc = accuracy(model, group, held, config.method, **kwargs) if evaluate else float("nan")
    return TrainResult(model, acc, config.steps, time.perf_counter() - started, [], lambda_net)


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

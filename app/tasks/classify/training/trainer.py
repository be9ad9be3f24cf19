"""Train the linear head and the λ-net (and, optionally, the backbone) with the paper's objectives.

The objective is the cross-entropy of the *combined* logits of the group copies:

* ``vanilla``   copy 0 only (with ``augment``: the training image under a random element);
* ``equitune``  the mean of the per-copy logits;
* ``equizero``  the selected copy, trained with the straight-through estimator (forward =
  equizero, backward = equitune), as in the paper: argmin has no gradient of its own;
* ``lambda``    the λ-weighted mean ``Σ λ_g logits_g / Σ λ_g`` (``combine(..., "lambda")``).
  The softmax is applied once, by the cross-entropy (the paper's code applies it twice).

With a frozen backbone (the default) training runs on cached features (``features.py``) and
an epoch costs milliseconds. With ``train_backbone`` every step runs the fused pass; the
backbone stays in eval mode even then: BatchNorm keeps its pretrained statistics (batches
here are small and group-expanded, so batch statistics would be skewed) and dropout stays
off. Nothing with train-time behaviour is ever active at evaluation.

Early stopping watches validation accuracy of the trained method; the best state (including
the state before any training, so fine-tuning never ends worse on validation than it
started) is restored at the end.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from app.backbones.base import LinearHeadBackbone
from app.backbones.datasets import ImageSet
from app.equivariance import EquivariantModel, FiniteGroup, LambdaNet, Method, ZeroLoss, combine

from .evaluate import accuracy, per_copy_outputs, random_elements
from .features import CopyFeatures, extract_features, transformed

log = logging.getLogger("equiserve.training")


@dataclass
class TrainConfig:
    objective: Method = Method.LAMBDA
    zero_loss: ZeroLoss = ZeroLoss.NEG_MAX_PROB  # equizero's selection loss (objective equizero)
    train_head: bool = True
    train_lambda: bool = True  # only the lambda objective gives the λ-net a gradient
    train_backbone: bool = False
    augment: bool = False  # each training image under a random group element, every step
    val_transform: Literal["identity", "random"] | None = None  # default: random iff augment
    epochs: int = 60
    patience: int = 8  # epochs without a better validation accuracy before stopping
    batch_size: int = 256
    lr: float = 1e-3
    backbone_lr: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.objective = Method(self.objective)
        self.zero_loss = ZeroLoss(self.zero_loss)
        if self.train_lambda and self.objective is not Method.LAMBDA:
            raise ValueError(f"the λ-net only gets a gradient from the lambda objective, not {self.objective.value}")
        if not (self.train_head or self.train_lambda or self.train_backbone):
            raise ValueError("nothing to train: choose head, lambda and/or backbone")

    @property
    def validation_transform(self) -> str:
        return self.val_transform or ("random" if self.augment else "identity")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["objective"], out["zero_loss"] = self.objective.value, self.zero_loss.value
        return out


@dataclass
class TrainResult:
    best_epoch: int  # 0 = the initial state was never beaten
    best_val_accuracy: float
    initial_val_accuracy: float
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def objective_loss(
    aligned: Tensor, log_lambda: Tensor | None, labels: Tensor, objective: Method, zero_loss: ZeroLoss
) -> Tensor:
    """Cross-entropy of the combined per-copy logits ``[|G|, B, K]`` (straight-through equizero)."""
    combined = combine(aligned, objective, log_lambda=log_lambda, zero_loss=zero_loss, straight_through=True)
    return F.cross_entropy(combined.output, labels)


def _copy_loss(features: Tensor, labels: Tensor, head: nn.Module, lambda_net: LambdaNet, config: TrainConfig) -> Tensor:
    if config.objective is Method.VANILLA:
        features = features[:1]  # vanilla reads copy 0 only: skip the head on the others
    n, batch = features.shape[:2]
    aligned = head(features.reshape(n * batch, -1)).reshape(n, batch, -1)  # classification: g⁻¹ acts trivially
    log_lambda = lambda_net(features) if config.objective is Method.LAMBDA else None
    return objective_loss(aligned, log_lambda, labels, config.objective, config.zero_loss)


def _val_elements(group: FiniteGroup, n: int, config: TrainConfig) -> Tensor:
    if config.validation_transform == "random":
        return random_elements(group, n, config.seed + 1)
    return torch.zeros(n, dtype=torch.long)


def validation_accuracy(val: CopyFeatures, head: nn.Module, lambda_net: LambdaNet, config: TrainConfig) -> float:
    """Accuracy of the trained method on the validation copies (under the validation transform)."""
    elements = _val_elements(val.group, len(val), config)
    need_lambda = config.objective is Method.LAMBDA
    aligned, log_lambda = per_copy_outputs(val.features, head, lambda_net if need_lambda else None)
    aligned = transformed(aligned, val.group, elements)
    log_lambda = transformed(log_lambda, val.group, elements) if log_lambda is not None else None
    return accuracy(aligned, log_lambda, val.labels, config.objective, config.zero_loss)


class _EarlyStopping:
    """Keeps the best state by validation accuracy (strictly better wins; ties keep the earlier)."""

    def __init__(self, modules: dict[str, nn.Module], patience: int, initial: float) -> None:
        self.modules, self.patience = modules, patience
        self.best, self.best_epoch, self.since = initial, 0, 0
        self.state = self._snapshot()

    def _snapshot(self) -> dict[str, dict[str, Tensor]]:
        return {name: copy.deepcopy(m.state_dict()) for name, m in self.modules.items()}

    def update(self, epoch: int, value: float) -> bool:
        """Record an epoch; returns True when training should stop."""
        if value > self.best:
            self.best, self.best_epoch, self.since = value, epoch, 0
            self.state = self._snapshot()
        else:
            self.since += 1
        return self.since >= self.patience

    def restore(self) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(self.state[name])


def _optimizer(
    head: nn.Module, lambda_net: LambdaNet, backbone: LinearHeadBackbone | None, config: TrainConfig
) -> torch.optim.Optimizer:
    """Adam over what ``config`` trains; everything else gets ``requires_grad=False``."""
    trunk = [p for name, p in backbone.named_parameters() if not name.startswith("classifier.")] if backbone else []
    groups: list[dict[str, Any]] = []
    for flag, params, lr in (
        (config.train_head, list(head.parameters()), config.lr),
        (config.train_lambda, list(lambda_net.parameters()), config.lr),
        (config.train_backbone, trunk, config.backbone_lr),
    ):
        for param in params:
            param.requires_grad_(flag)
        if flag and params:
            groups.append({"params": params, "lr": lr})
    return torch.optim.Adam(groups, weight_decay=config.weight_decay)


def train_on_features(
    train: CopyFeatures, val: CopyFeatures, head: nn.Module, lambda_net: LambdaNet, config: TrainConfig
) -> TrainResult:
    """Train ``head`` and/or ``lambda_net`` in place on cached copies (frozen backbone)."""
    if config.train_backbone:
        raise ValueError("a frozen-backbone feature cache cannot train the backbone; use train_end_to_end")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    group, n = train.group, len(train)
    optimizer = _optimizer(head, lambda_net, None, config)
    start = time.perf_counter()
    initial = validation_accuracy(val, head, lambda_net, config)
    stopper = _EarlyStopping({"head": head, "lambda_net": lambda_net}, config.patience, initial)
    history: list[dict[str, float]] = [{"epoch": 0, "val_accuracy": initial}]
    bar = tqdm(range(1, config.epochs + 1), desc=f"train {config.objective.value}", disable=not config.progress)
    epoch = 0
    for epoch in bar:
        head.train()
        lambda_net.train()
        order = torch.randperm(n, generator=generator)
        total, seen = 0.0, 0
        for begin in range(0, n, config.batch_size):
            idx = order[begin : begin + config.batch_size]
            features = train.features[:, idx]
            if config.augment:
                features = transformed(features, group, torch.randint(group.order, (len(idx),), generator=generator))
            loss = _copy_loss(features, train.labels[idx], head, lambda_net, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        val_acc = validation_accuracy(val, head, lambda_net, config)  # puts both modules in eval mode
        history.append({"epoch": epoch, "train_loss": total / seen, "val_accuracy": val_acc})
        bar.set_postfix(loss=f"{total / seen:.4f}", val=f"{val_acc:.4f}", best=f"{stopper.best:.4f}")
        if stopper.update(epoch, val_acc):
            break
    bar.close()
    stopper.restore()
    head.eval()
    lambda_net.eval()
    head.requires_grad_(False)
    lambda_net.requires_grad_(False)
    return TrainResult(stopper.best_epoch, stopper.best, initial, epoch, time.perf_counter() - start, history)


def train_end_to_end(
    backbone: LinearHeadBackbone,
    lambda_net: LambdaNet,
    group: FiniteGroup,
    train: ImageSet,
    val: ImageSet,
    config: TrainConfig,
) -> TrainResult:
    """Fine-tune the backbone together with its head (``backbone.classifier``) and/or λ-net.

    Every step is the serving model's fused pass over the copies of a batch; the backbone
    stays in eval mode (pretrained BatchNorm statistics, no dropout) while its weights train.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    head = backbone.classifier
    model = EquivariantModel(backbone.encode, backbone.head, group)  # features only; λ-net applied below
    optimizer = _optimizer(head, lambda_net, backbone, config)
    backbone.eval()
    size = backbone.input_size

    def val_accuracy() -> float:
        copies = extract_features(backbone, group, val, progress=False)
        return validation_accuracy(copies, head, lambda_net, config)

    start = time.perf_counter()
    initial = val_accuracy()
    stopper = _EarlyStopping({"backbone": backbone, "lambda_net": lambda_net}, config.patience, initial)
    history: list[dict[str, float]] = [{"epoch": 0, "val_accuracy": initial}]
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        lambda_net.train()
        order = rng.permutation(len(train))
        total, seen = 0.0, 0
        steps = range(0, len(train), config.batch_size)
        for begin in tqdm(steps, desc=f"epoch {epoch}", disable=not config.progress, leave=False):
            idx = order[begin : begin + config.batch_size]
            pixels = train.pixels(idx, size).to(backbone.device)
            labels = torch.as_tensor(train.labels[idx]).to(backbone.device)
            elements = torch.randint(group.order, (len(idx),), generator=generator)
            if config.objective is Method.VANILLA:
                # Only copy 0 counts: run the one copy each image needs, not all |G|.
                if config.augment:
                    pixels = group.expand(pixels).reshape(group.order, len(idx), *pixels.shape[1:])
                    pixels = pixels[elements, torch.arange(len(idx))]
                features = backbone.encode(pixels)[None]
            else:
                features, _ = model.encode_copies(pixels)
                if config.augment:
                    features = transformed(features, group, elements.to(features.device))
            loss = _copy_loss(features, labels, head, lambda_net, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        val_acc = val_accuracy()
        history.append({"epoch": epoch, "train_loss": total / seen, "val_accuracy": val_acc})
        log.info("epoch %d: loss %.4f, val accuracy %.4f", epoch, total / seen, val_acc)
        if stopper.update(epoch, val_acc):
            break
    stopper.restore()
    backbone.eval()
    lambda_net.eval()
    backbone.requires_grad_(False)
    lambda_net.requires_grad_(False)
    return TrainResult(stopper.best_epoch, stopper.best, initial, epoch, time.perf_counter() - start, history)

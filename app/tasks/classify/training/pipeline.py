"""The train and evaluate jobs behind ``python -m app train`` / ``evaluate`` (usable without the CLI).

``train_job``: backbone (new, or an existing model entry to continue from) -> data splits ->
feature cache (frozen backbone) or end-to-end steps -> early-stopped training -> the model
entry written and reloaded through the registry, bit for bit.

``evaluate_job``: a model entry loaded exactly as the server loads it -> the test set's
copies (through the same cache) -> the accuracy table and λ statistics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.backbones.base import LinearHeadBackbone
from app.backbones.datasets import ImageSet, load_splits, load_test
from app.backbones.factory import create_backbone
from app.equivariance import LambdaNet, Method, ZeroLoss, image_group

from .evaluate import EvalReport, evaluate_features
from .export import WrittenModel, verify_reload, write_model
from .features import DEFAULT_CACHE_DIR, FeatureCache, use_fast_cpu_layout
from .trainer import TrainConfig, TrainResult, train_end_to_end, train_on_features

log = logging.getLogger("equiserve.training")


@dataclass
class TrainJob:
    name: str
    models_dir: Path = Path("models")
    data: str = "fashion-mnist"
    family: str = "efficientnet_lite"
    options: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # an existing model entry: its backbone, head and λ-net are the start
    group: str | None = None  # default: init_from's group, else c4
    train_size: int | None = None
    val_size: int | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    config: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: Path | None = DEFAULT_CACHE_DIR  # None: no feature cache on disk
    default_method: Method | None = None
    device: str = "cpu"
    feature_batch_size: int = 32
    fast_cpu_layout: bool = True
    description: str = ""
    command: str = ""  # recorded in model.yaml's header


@dataclass
class TrainOutcome:
    result: TrainResult
    written: WrittenModel
    train_size: int
    val_size: int
    feature_seconds: float
    backbone: LinearHeadBackbone  # with the trained head as ``classifier``
    lambda_net: LambdaNet | None  # None when no λ-net was trained (the entry serves uniform λ)


def _start(job: TrainJob) -> tuple[LinearHeadBackbone, LambdaNet | None, str, dict[str, Any], str, ZeroLoss]:
    """The backbone to train on, the λ-net to start from (None: new), family, options, group, zero loss."""
    from app.repository import resolve_device
    from app.tasks import load_model

    if job.init_from is not None:
        loaded = load_model(job.models_dir, job.init_from, device=job.device, channels_last=False)
        if not isinstance(loaded.backbone, LinearHeadBackbone):
            raise ValueError(f"{job.init_from}: training needs a CNN backbone with a linear head")
        lambda_net = loaded.model.lambda_net if loaded.lambda_trained else None
        spec = loaded.spec
        return (
            loaded.backbone,
            lambda_net,
            spec.backbone.family,
            dict(spec.backbone.options),
            job.group or spec.group,
            spec.zero_loss,
        )
    backbone = create_backbone(job.family, **job.options)
    if not isinstance(backbone, LinearHeadBackbone):
        raise ValueError(f"training needs a CNN backbone with a linear head, not {job.family}")
    backbone.to(resolve_device(job.device)).eval()
    return backbone, None, job.family, dict(job.options), job.group or "c4", job.config.zero_loss


def train_job(job: TrainJob) -> TrainOutcome:
    config = job.config
    backbone, lambda_net, family, options, group_name, zero_loss = _start(job)
    group = image_group(group_name)
    splits = load_splits(
        job.data, train_size=job.train_size, val_size=job.val_size, val_fraction=job.val_fraction, seed=job.split_seed
    )
    labels = splits.train.classes
    torch.manual_seed(config.seed)
    if job.init_from is None or backbone.labels != labels:
        backbone.replace_head(labels)  # a new head (seeded) over the data's classes
    lambda_trained = lambda_net is not None or (config.train_lambda and config.objective is Method.LAMBDA)
    if lambda_net is None:
        lambda_net = LambdaNet(backbone.feature_dim).to(backbone.device)
    lambda_net.float()

    feature_seconds = 0.0
    if job.fast_cpu_layout and backbone.device.type == "cpu":
        use_fast_cpu_layout(backbone)
    if config.train_backbone:
        result = train_end_to_end(backbone, lambda_net, group, splits.train, splits.val, config)
        probe = backbone.encode(splits.val.pixels(range(min(8, len(splits.val))), backbone.input_size)).detach()
    else:
        cache = FeatureCache(job.cache_dir or DEFAULT_CACHE_DIR, enabled=job.cache_dir is not None)
        start = time.perf_counter()
        train_copies, val_copies = (
            cache.load_or_compute(backbone, group, data, batch_size=job.feature_batch_size, progress=config.progress)
            for data in (splits.train, splits.val)
        )
        feature_seconds = time.perf_counter() - start
        result = train_on_features(train_copies, val_copies, backbone.classifier, lambda_net, config)
        probe = val_copies.features[0, :64]

    default = job.default_method or (
        Method.LAMBDA
        if lambda_trained
        else config.objective
        if config.objective in (Method.EQUITUNE, Method.EQUIZERO)
        else Method.EQUITUNE
    )
    header = "\n".join(
        [
            f"command: {job.command}" if job.command else "",
            f"data: {job.data} ({len(splits.train)} train / {len(splits.val)} val images), group {group.name}",
            f"objective {config.objective.value}; trained {_trained(config)}; augment {config.augment}",
            f"validation accuracy ({config.validation_transform}): {result.initial_val_accuracy:.4f} before, "
            f"{result.best_val_accuracy:.4f} best (epoch {result.best_epoch} of {result.epochs_run})",
        ]
    )
    written = write_model(
        job.models_dir,
        job.name,
        family=family,
        options=options,
        backbone=backbone,
        group=group,
        labels=labels,
        lambda_net=lambda_net if lambda_trained else None,
        default_method=default,
        zero_loss=zero_loss if config.objective is not Method.EQUIZERO else config.zero_loss,
        description=job.description,
        header=header,
        save_trunk=True if config.train_backbone else None,
    )
    verify_reload(job.models_dir, job.name, backbone, lambda_net if lambda_trained else None, probe)
    return TrainOutcome(
        result,
        written,
        len(splits.train),
        len(splits.val),
        feature_seconds,
        backbone,
        lambda_net if lambda_trained else None,
    )


def _trained(config: TrainConfig) -> str:
    parts = [n for n, f in (("head", config.train_head), ("lambda", config.train_lambda)) if f]
    return "+".join([*parts, "backbone"] if config.train_backbone else parts)


@dataclass
class EvaluateJob:
    model: str
    models_dir: Path = Path("models")
    data: str = "fashion-mnist"
    split: str = "test"
    test_size: int | None = None
    seed: int = 0  # draws the test subset and the random group elements
    cache_dir: Path | None = DEFAULT_CACHE_DIR
    device: str = "cpu"
    feature_batch_size: int = 32
    fast_cpu_layout: bool = True
    progress: bool = True


def evaluate_job(job: EvaluateJob) -> tuple[EvalReport, ImageSet]:
    """The served model (``registry.load_model``) on the test set: every method, three test sets."""
    from app.tasks import load_model

    loaded = load_model(job.models_dir, job.model, device=job.device, channels_last=False)
    test = load_test(job.data, test_size=job.test_size, seed=job.seed, split=job.split)
    if loaded.backbone.labels != test.classes:
        raise ValueError(f"{job.model} predicts {loaded.backbone.labels}, the data has classes {test.classes}")
    if job.fast_cpu_layout and loaded.device.type == "cpu":
        use_fast_cpu_layout(loaded.backbone)
    cache = FeatureCache(job.cache_dir or DEFAULT_CACHE_DIR, enabled=job.cache_dir is not None)
    copies = cache.load_or_compute(
        loaded.backbone, loaded.model.group, test, batch_size=job.feature_batch_size, progress=job.progress
    )
    lambda_net = loaded.model.lambda_net if loaded.lambda_trained else None
    return evaluate_features(copies, loaded.backbone.head, lambda_net, seed=job.seed), test

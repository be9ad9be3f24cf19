"""``python -m app train`` and ``python -m app evaluate``: flags -> ``TrainJob`` / ``EvaluateJob``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from app.backbones.factory import IMAGE_FAMILIES
from app.command_line import add_device, add_models_dir, command_line, configure_logging
from app.equivariance import IMAGE_GROUP_NAMES, Method, ZeroLoss

from .training import DEFAULT_CACHE_DIR

TRAINABLE = ("head", "lambda", "backbone")
TRAINABLE_FAMILIES = [f for f in IMAGE_FAMILIES if f in ("efficientnet_lite", "torchvision")]


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value: ``input_size=64`` -> 64, ``pretrained=true`` -> True."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, yaml.safe_load(value)


def _common(parser: argparse.ArgumentParser) -> None:
    add_models_dir(parser)
    parser.add_argument(
        "--data",
        default="fashion-mnist",
        help="`fashion-mnist` (the Debian IDX files) or an image-folder root: <root>/<class>/<images>, "
        "or <root>/train|val|test/<class>/<images>",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"feature cache (default {DEFAULT_CACHE_DIR})"
    )
    parser.add_argument("--no-cache", action="store_true", help="compute features in memory only")
    add_device(parser)
    parser.add_argument("--feature-batch-size", type=int, default=32, help="images per fused pass (x|G| copies)")
    parser.add_argument("--exact-layout", action="store_true", help="no channels_last on the CPU (slower)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parsers(commands: Any) -> None:
    add_train_parser(commands)
    add_evaluate_parser(commands)


def add_train_parser(commands: Any) -> None:
    p = commands.add_parser(
        "train",
        help="train a λ-net / linear head (/ backbone) and write models/<name>",
        description="Train the λ-net and/or a linear head (and optionally fine-tune the backbone) on a data set, "
        "then write models/<name>/model.yaml + safetensors that `serve` loads unchanged.",
    )
    p.add_argument("--name", required=True, help="model entry to write: <models-dir>/<name>/")
    # The families training can build and fine-tune (a CNN with a linear head).
    p.add_argument("--backbone", default="efficientnet_lite", choices=TRAINABLE_FAMILIES, help="backbone family")
    p.add_argument(
        "--option",
        type=_option,
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="backbone options, YAML values (e.g. --option variant=0 pretrained=true input_size=64)",
    )
    p.add_argument("--init-from", help="start from an existing model entry (its backbone, head, λ-net, group)")
    p.add_argument("--group", choices=IMAGE_GROUP_NAMES, help="default: the init model's group, else c4")
    p.add_argument(
        "--objective", choices=[m.value for m in Method], default=Method.LAMBDA.value, help="the method trained"
    )
    p.add_argument(
        "--zero-loss",
        choices=[z.value for z in ZeroLoss],
        default=ZeroLoss.NEG_MAX_PROB.value,
        help="the loss by which equizero picks its copy",
    )
    p.add_argument(
        "--train",
        nargs="+",
        choices=TRAINABLE,
        default=None,
        help="what to train (default: head lambda for the lambda objective, else head)",
    )
    p.add_argument("--augment", action="store_true", help="each training image under a random group element")
    p.add_argument("--val-transform", choices=("identity", "random"), help="default: random iff --augment")
    p.add_argument("--train-size", type=int, help="training images (default: all but the validation split)")
    p.add_argument("--val-size", type=int, help="validation images, carved from the training data")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share when --val-size is not given")
    p.add_argument("--epochs", type=int, default=60, help="most passes over the training images")
    p.add_argument("--patience", type=int, default=8, help="early stopping on validation accuracy")
    p.add_argument("--batch-size", type=int, default=256, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the head and the λ-net")
    p.add_argument("--backbone-lr", type=float, default=1e-4, help="learning rate of the backbone, when trained")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and the batches")
    p.add_argument("--default-method", choices=[m.value for m in Method], help="default: lambda when λ is trained")
    p.add_argument("--description", default="", help="the entry's description in model.yaml")
    p.add_argument("--report", type=Path, help="write the training history as JSON here")
    _common(p)
    p.set_defaults(run=run_train)


def add_evaluate_parser(commands: Any) -> None:
    p = commands.add_parser(
        "evaluate",
        help="accuracy of every method on upright and transformed test images",
        description="Top-1 accuracy of vanilla, equitune, equizero (both losses) and λ-equitune of a served model "
        "on the upright test set, under a random group element per image and under every element; λ statistics.",
    )
    p.add_argument("--model", required=True, help="model entry: <models-dir>/<model>/model.yaml")
    p.add_argument("--split", default="test", help="Fashion-MNIST split or image-folder subfolder (default test)")
    p.add_argument("--test-size", type=int, help="a seeded random subset of the test split")
    p.add_argument("--seed", type=int, default=0, help="seeds the subset and the random group elements")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    _common(p)
    p.set_defaults(run=run_evaluate)


def _logging(quiet: bool) -> None:
    configure_logging(logging.WARNING if quiet else logging.INFO)


def run_train(args: argparse.Namespace) -> int:
    from app.repository import ModelLoadError

    from .training.pipeline import TrainJob, train_job
    from .training.trainer import TrainConfig

    _logging(args.quiet)
    objective = Method(args.objective)
    trained = set(args.train or (["head", "lambda"] if objective is Method.LAMBDA else ["head"]))
    try:
        config = TrainConfig(
            objective=objective,
            zero_loss=ZeroLoss(args.zero_loss),
            train_head="head" in trained,
            train_lambda="lambda" in trained,
            train_backbone="backbone" in trained,
            augment=args.augment,
            val_transform=args.val_transform,
            epochs=args.epochs,
            patience=args.patience,
            batch_size=args.batch_size,
            lr=args.lr,
            backbone_lr=args.backbone_lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
            progress=not args.quiet,
        )
    except ValueError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    job = TrainJob(
        name=args.name,
        models_dir=args.models_dir,
        data=args.data,
        family=args.backbone,
        options=dict(args.option),
        init_from=args.init_from,
        group=args.group,
        train_size=args.train_size,
        val_size=args.val_size,
        val_fraction=args.val_fraction,
        split_seed=args.seed,
        config=config,
        cache_dir=None if args.no_cache else args.cache_dir,
        default_method=Method(args.default_method) if args.default_method else None,
        device=args.device,
        feature_batch_size=args.feature_batch_size,
        fast_cpu_layout=not args.exact_layout,
        description=args.description,
        command=command_line(args),
    )
    try:
        outcome = train_job(job)
    except (ValueError, FileNotFoundError, KeyError, ModelLoadError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    r = outcome.result
    print(
        f"{job.name}: validation accuracy {r.initial_val_accuracy:.4f} -> {r.best_val_accuracy:.4f} "
        f"(best epoch {r.best_epoch} of {r.epochs_run}, {r.seconds:.1f} s training, "
        f"{outcome.feature_seconds:.1f} s features); wrote {outcome.written.folder} and reloaded it bit for bit"
    )
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        report = {"job": job.name, "config": config.to_dict(), "result": r.to_dict(), "train_size": outcome.train_size}
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from app.repository import ModelLoadError

    from .training.evaluate import print_report
    from .training.pipeline import EvaluateJob, evaluate_job

    _logging(args.quiet)
    job = EvaluateJob(
        model=args.model,
        models_dir=args.models_dir,
        data=args.data,
        split=args.split,
        test_size=args.test_size,
        seed=args.seed,
        cache_dir=None if args.no_cache else args.cache_dir,
        device=args.device,
        feature_batch_size=args.feature_batch_size,
        fast_cpu_layout=not args.exact_layout,
        progress=not args.quiet,
    )
    try:
        report, test = evaluate_job(job)
    except (ValueError, FileNotFoundError, KeyError, ModelLoadError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print_report(report, title=f"{job.model} on {test.name}")
    if args.out:
        report.write_json(args.out, model=job.model, data=job.data, split=job.split)
        print(f"wrote {args.out}")
    return 0

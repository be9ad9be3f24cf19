"""``python -m app train-scan`` (meanwhile ``python -m app.tasks.translate.cli train-scan ...``).

Trains the non-equivariant SCAN seq2seq of one split and cell for each seed, keeps the seed with the
best held-out (in-distribution) accuracy, trains a λ-net per group on the frozen model (the zero-shot
λ of λ-equitune), and writes one ``models/<name>/`` entry per group: the first group under ``--name``,
the others under ``<name>-<group>`` (the weights are the same; each entry serves one group)::

    python -m app train-scan --split add_jump --cell gru        # scan-gru-addjump (verb4), scan-gru-addjump-verb
    python -m app train-scan --split around_right --cell lstm   # scan-lstm-aroundright (direction)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.command_line import add_models_dir, configure_logging

# seq2seq.CELLS, written out so that building the parser does not import torch (a test keeps them equal)
TRAINABLE_CELLS = ("gru", "lstm", "rnn")

DEFAULT_GROUPS = {"add_jump": ["verb4", "verb"], "around_right": ["direction"]}
PRETRAIN_FLAGS = ("steps", "batch_size", "learning_rate", "hidden", "held_out", "eval_every", "short_repeats")


def add_parsers(commands: Any) -> None:
    add_train_scan_parser(commands)


def add_train_scan_parser(commands: Any) -> None:
    p = commands.add_parser(
        "train-scan",
        help="train SCAN seq2seq models (GRU/LSTM) and write models/scan-*",
        description="Train a seq2seq with attention on a SCAN split's training commands (one run per seed), keep "
        "the seed with the best held-out accuracy, train a λ-net per group on it, and write models/<name>/ "
        "entries that `serve` loads as translate models.",
    )
    p.add_argument("--split", default="add_jump", choices=("add_jump", "around_right"), help="SCAN split")
    p.add_argument("--cell", default="gru", choices=TRAINABLE_CELLS, help="recurrent cell")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training run each; the best ships")
    # None: the default of app.tasks.translate.training.PretrainConfig (defined there once; torch is not imported here)
    p.add_argument("--steps", type=int, default=None, help="training steps (mini-batches)")
    p.add_argument("--batch-size", type=int, default=None, help="commands per training step")
    p.add_argument("--lr", dest="learning_rate", type=float, default=None, help="Adam's learning rate")
    p.add_argument("--hidden", type=int, default=None, help="hidden size of encoder and decoder")
    p.add_argument("--held-out", type=float, default=None, help="share of the training commands held out")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations")
    p.add_argument(
        "--short-repeats",
        type=int,
        default=None,
        help="copies of each command of at most 3 words in the training data (1: as the split has them)",
    )
    p.add_argument("--groups", nargs="+", default=None, help="groups to serve (default: verb4 verb / direction)")
    p.add_argument("--lambda-steps", type=int, default=None, help="λ-net steps per group (0: a uniform λ)")
    p.add_argument("--name", default=None, help="model folder name (default: scan-<cell>-<split>)")
    add_models_dir(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train_scan)


def run_train_scan(args: argparse.Namespace) -> int:
    import torch

    from .training import LAMBDA_STEPS, SPLIT_NAMES, PretrainConfig, ship_best

    configure_logging()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared machine
    given = {k: getattr(args, k) for k in PRETRAIN_FLAGS if getattr(args, k) is not None}
    configs = [PretrainConfig(split=args.split, cell=args.cell, seed=seed, **given) for seed in args.seeds]
    groups = args.groups or DEFAULT_GROUPS[args.split]
    name = args.name or f"scan-{args.cell}-{SPLIT_NAMES[args.split]}"
    lambda_steps = LAMBDA_STEPS if args.lambda_steps is None else args.lambda_steps
    folders = ship_best(configs, groups, args.models_dir, name, lambda_steps=lambda_steps, progress=not args.quiet)
    print(json.dumps({"models": [str(f) for f in folders]}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.tasks.translate.cli")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

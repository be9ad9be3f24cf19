"""``python -m app <command>``: one entry point. Each command module registers its own
subcommands (``add_parsers``) with a ``run(args) -> int``; flags are defined without
importing torch, and a command's work is imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from pathlib import Path

from app.config import DEFAULT_MODELS_DIR

# Modules with ``add_parsers(commands)``: serve, then training and evaluation per task.
COMMAND_MODULES = (
    "app.serving",
    "app.training.cli",
    "app.training.text_cli",
    "app.training.dqn_cli",
    "app.training.scan_cli",
)


def add_models_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help=f"model repository (default: {DEFAULT_MODELS_DIR})"
    )


def add_device(parser: argparse.ArgumentParser, default: str = "cpu") -> None:
    parser.add_argument("--device", default=default, choices=("auto", "cpu", "cuda"), help=f"default: {default}")


def command_line(args: argparse.Namespace) -> str:
    """How this run was started, for the reports it writes."""
    return "python -m app " + shlex.join(args.argv)


def configure_logging(level: str | int = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="equiserve: equivariant model serving")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.run(args)

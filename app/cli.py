"""``python -m app <command>``: one entry point. ``serve`` and each registered task's commands
(``app.tasks.TASKS``: its ``cli`` module) register their subcommands (``add_parsers``) with a
``run(args) -> int``; flags are defined without importing torch, and a command's work is
imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from app.command_line import DefaultsHelpFormatter
from app.tasks import TASKS, task_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="equiserve: equivariant model serving")
    commands = parser.add_subparsers(dest="command", required=True)
    importlib.import_module("app.serving").add_parsers(commands)
    for task in TASKS:
        module = task_cli(task)
        if module is not None:
            module.add_parsers(commands)
    for command in commands.choices.values():
        command.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.run(args)

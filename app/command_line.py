"""What every command line shares (``serve`` and each task's train / evaluate commands): common
flags, the logging set-up, and how a run was started."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shlex
import sys
from pathlib import Path

from app.config import DEFAULT_MODELS_DIR

# Third-party loggers that narrate at INFO what only matters when debugging (the ONNX
# exporter prints every optimisation pass): WARNING and up unless EQUISERVE_LOG_LEVEL=debug.
CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "onnxruntime", "httpx", "transformers", "accelerate")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help already says it or there is none
    to say (a default of None means "decided later", which each help text explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


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


def configure_server_logging(level: str) -> None:
    configure_logging(level.upper())
    if level != "debug":
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def require_extra(extra: str, what: str, *modules: str) -> None:
    """Stop with one line naming the extra to install when ``what`` needs modules that are missing
    (instead of a ``ModuleNotFoundError`` deep in an import)."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"{what} needs the {extra!r} extra ({', '.join(missing)} is not installed): "
            f"pip install -e '.[{extra}]' from the repository"
        )

"""What every command line shares: a command whose optional extra is missing says which to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from app.cli import main


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [
        (["serve", "--ray"], "ray", "ray"),
        (["train-dqn", "--steps", "10", "--name", "agent"], "stable_baselines3", "rl"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(
    argv: list[str], module: str, extra: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what importlib sees where it is not installed
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--models-dir", str(tmp_path)])
    message = str(exit_.value.code)
    assert f"needs the {extra!r} extra ({module} is not installed)" in message
    assert f"pip install -e '.[{extra}]'" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # stopped before doing anything


def test_every_flag_of_every_command_says_what_it_does_and_its_default() -> None:
    import argparse

    from app.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            flag = action.option_strings[0]
            assert action.help, f"{name} {flag} has no help text"
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            boolean = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
            if shown not in (None, argparse.SUPPRESS) and not boolean:
                assert f"default: {shown}" in text or "default" in action.help, f"{name} {flag}: {action.help}"

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

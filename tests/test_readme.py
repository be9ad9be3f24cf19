"""The README stays true: its Python snippets run, its tables name every setting."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_python_snippets_run() -> None:
    snippets = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert snippets
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {})


def test_configuration_table_lists_every_setting() -> None:
    for name in Settings.model_fields:
        assert f"| `EQUISERVE_{name.upper()}` | `--{name.replace('_', '-')}` |" in README, name


def test_ci_runs_the_readme_test_command() -> None:
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    command = re.search(r"python3 -m pytest[^\n`]*", README)
    assert command is not None and command.group(0) in ci

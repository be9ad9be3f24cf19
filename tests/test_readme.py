"""The README stays true: its Python snippets run, its tables name every setting."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_snippets_run() -> None:
    snippets = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert snippets
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {})


def test_configuration_table_lists_every_setting() -> None:
    for name in Settings.model_fields:
        assert f"| `EQUISERVE_{name.upper()}` | `--{name.replace('_', '-')}` |" in README, name


def test_task_limits_table_lists_every_limit_of_every_task() -> None:
    """Each task's row(s) in the task limits table name each of its limits, and no limit that is gone."""
    from app.tasks import TASKS, task_limits

    rows: dict[str, set[str]] = {}
    for task, names in re.findall(r"^\| (\w+) \| (`[A-Z_`, ]+`) \|", README, flags=re.M):
        rows.setdefault(task, set()).update(re.findall(r"`([A-Z_]+)`", names))
    for task in TASKS:
        assert rows.get(task) == {name.upper() for name in task_limits(task).model_fields}, task


def test_ci_runs_the_readme_test_command() -> None:
    """CI calls exactly the one test command the README gives a new user, and that command
    installs what the tests need before it runs them."""
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert "./scripts/test\n" in commands
    assert "exec ./scripts/test" in ci
    script = (ROOT / "scripts" / "test").read_text()
    assert "scripts/install --test" in script and "pytest" in script


def test_the_docs_point_only_inside_the_repository() -> None:
    """No file refers to the team's architecture notes, which live outside the repository,
    and every relative link of the README and docs/ leads to a file that exists."""
    outside = "ARCHITECTURE" + ".md"  # spelled apart so that this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yml", ".yaml", ".json", ".toml", ""} and path.is_file():
            text = path.read_text(errors="replace")
            assert outside not in text, name
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to a missing {target}"

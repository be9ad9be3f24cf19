"""The README stays short and true, and the tables it points to stay complete: every setting, every
task limit, every error code, every optional extra. (Its examples, and those of docs/, run in
tests/test_docs_examples.py.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# The complete settings, task-limits and error tables (the README links them).
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def section(text: str, heading: str) -> str:
    """The text under a Markdown heading, up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}[ \t]*$", text, flags=re.M)
    assert match, heading
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{len(match.group(1))}}} ", rest, flags=re.M)
    return rest if end is None else rest[: end.start()]


def table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def test_readme_is_read_in_ten_minutes() -> None:
    lines = README.count("\n")
    assert lines <= 300, f"README.md has {lines} lines; the details belong in docs/"


def test_configuration_table_lists_every_setting() -> None:
    for name in Settings.model_fields:
        assert f"| `EQUISERVE_{name.upper()}` | `--{name.replace('_', '-')}` |" in CONFIGURATION, name


def test_readme_settings_are_real_settings() -> None:
    """The README's short table names settings that exist, with their flags and defaults."""
    rows = re.findall(
        r"^\| `EQUISERVE_(\w+)` \| `--([\w-]+)` \| `?([^|`]+?)`? \|", section(README, "Configuration"), re.M
    )
    assert len(rows) >= 5
    for env, flag, _default in rows:
        name = env.lower()
        assert name in Settings.model_fields, env
        assert flag == name.replace("_", "-"), env
        assert f"| `EQUISERVE_{env}` | `--{flag}` |" in CONFIGURATION, env
    assert "docs/configuration.md" in section(README, "Configuration")


def test_task_limits_table_lists_every_limit_of_every_task() -> None:
    """Each task's row(s) in the task limits table name each of its limits, and no limit that is gone."""
    from app.tasks import TASKS, task_limits

    rows: dict[str, set[str]] = {}
    for task, names in re.findall(r"^\| (\w+) \| (`[A-Z_`, ]+`) \|", CONFIGURATION, flags=re.M):
        rows.setdefault(task, set()).update(re.findall(r"`([A-Z_]+)`", names))
    for task in TASKS:
        assert rows.get(task) == {name.upper() for name in task_limits(task).model_fields}, task


def test_error_table_lists_every_status_the_server_answers() -> None:
    """Every engine error code with its status, and the HTTP-only ones, are rows of the table the
    README links ("Limits and errors")."""
    from app.api import errors

    table = section(CONFIGURATION, "Limits and errors")
    rows = {(int(status), code) for status, codes in re.findall(r"^\| (\d{3}) \| ([^|]+) \|", table, re.M)
            for code in re.findall(r"`(\w+)`", codes)}  # fmt: skip
    expected = {(status, code) for code, status in errors.STATUS.items()} | {
        (cls.status, cls.code) for cls in errors.ApiError.__subclasses__()
    }
    expected |= {(404, "not_found"), (405, "method_not_allowed"), (408, "request_timeout")}
    assert not expected - rows, f"missing from docs/configuration.md: {sorted(expected - rows)}"
    assert "docs/configuration.md#limits-and-errors" in README


def test_extras_table_lists_every_optional_extra() -> None:
    """Each extra of pyproject.toml has a row saying what it enables and its install line, and no
    row names an extra that is gone."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    optional = pyproject.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^([\w-]+) = \[", optional, flags=re.M)
    rows = {cells[0].strip("`"): cells for cells in table_rows(section(README, "Extras"))}
    assert set(rows) == set(extras)
    for name, (_, enables, install) in rows.items():
        assert enables, name
        assert f"pip install -e '.[{name}]'" in install, name


def test_performance_table_names_its_commands_and_results() -> None:
    """Every ratio of the README's one Performance table comes with the command that measures it,
    and every results file it names exists."""
    performance = section(README, "Performance")
    assert performance.count("\n|---") == 1, "one table"
    rows = table_rows(performance)
    assert rows
    for ratio, value, measured in rows:
        assert re.search(r"\d", value), ratio
        assert re.search(r"`python bench/\w+\.py[^`]*`", measured), ratio
        for name in re.findall(r"bench/results/[\w{},.-]+", measured):
            expanded = re.sub(r"\{([^}]*)\}", lambda m: m.group(1).split(",")[0], name)
            assert (ROOT / expanded).exists(), name


def test_ci_runs_the_readme_test_command() -> None:
    """CI calls exactly the one test command the README gives a new user, and that command
    installs what the tests need before it runs them."""
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert "./scripts/test\n" in commands
    assert "./scripts/serve\n" in commands
    assert "exec ./scripts/test" in ci
    script = (ROOT / "scripts" / "test").read_text()
    assert "scripts/install --test" in script and "pytest" in script


def test_the_docs_point_only_inside_the_repository() -> None:
    """No file refers to the team's architecture notes, which live outside the repository,
    every relative link of the README, docs/ and bench/README.md leads to a file that exists, and
    the README and docs/ link nowhere outside the repository."""
    outside = "ARCHITECTURE" + ".md"  # spelled apart so that this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yml", ".yaml", ".json", ".toml", ""} and path.is_file():
            text = path.read_text(errors="replace")
            assert outside not in text, name
    docs = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (doc.parent / target).exists(), f"{doc.name} links to a missing {target}"
        for url in re.findall(r"\]\((\w+://[^)]*)\)|<(\w+://[^>]*)>", text):
            url = url[0] or url[1]
            assert re.match(r"https?://(localhost|127\.0\.0\.1)[:/]", url), f"{doc.name} links outside: {url}"


def test_docs_write_no_issue_numbers() -> None:
    """The docs describe the project, not its tracker: no issue numbers in the README or docs/."""
    for doc in [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert not re.search(r"\bissues? #\d+|\(#\d+\)", doc.read_text()), doc.name

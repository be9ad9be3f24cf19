"""Every example of README.md and docs/*.md runs as pasted from the repository's folder.

The examples are the fenced ```python, ```bash and ```console blocks:

* **Server examples** (a block naming ``localhost:8000`` or ``127.0.0.1:8000``) run against one real
  ``python -m app serve`` on the shipped models they name, in document order, with the port
  rewritten: each ``curl`` must answer 2xx and carry ``-f`` (so that it fails loudly when pasted),
  unless a console transcript shows an ``{"error": ...}`` on purpose, which must then come back with
  that code. Each answer must have the fields the transcript shows, or the fields its route
  documents (``SHAPES``).
* **Other Python blocks** run in a fresh interpreter.
* **Other shell blocks** start long jobs (training, benchmarks, the test suite, the server): every
  ``python`` command line is parsed by its real argument parser, without running it, and every
  script or file it names must exist.
* **Skipped by design**, and listed as skipped with the reason: blocks that build or run containers
  (podman, docker), talk to a Kubernetes cluster (kubectl) or run a Ray cluster; and Python blocks
  whose first line is ``# not run by tests/test_docs_examples.py: <reason>`` (``SKIP_MARKER``),
  for a GPU or the internet.

Every example runs in a copy of the working tree, which must be unchanged afterwards: an example
leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.apptools import free_port, start_server, wait_ready

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SERVER = re.compile(r"\b(localhost|127\.0\.0\.1):(8000|8001)\b")  # 8001: its gRPC port (docs/v2.md)
GRPC_PORT: list[int] = []  # the port the examples' 8001 becomes, once the server runs
SHELL = {"bash", "sh", "shell", "console"}
SKIP_MARKER = re.compile(r"\A# not run by tests/test_docs_examples\.py: (.+)\n")
# The only kinds of example that are not run: what this test cannot do on a developer's machine.
SKIP_KINDS = {
    "builds or runs containers (podman, docker); tests/test_container.py does it": re.compile(
        r"^(podman|docker|(\./)?scripts/build-image)\b"
    ),
    "needs a Kubernetes cluster (kubectl); tests/test_deploy_k8s.py checks the manifests": re.compile(r"^kubectl\b"),
    "starts a Ray cluster; tests/test_ray_serve.py does it": re.compile(r"(^|\s)--ray(\s|$)|^serve (run|deploy)\b"),
}
PYTHON_SKIP_REASONS = ("needs a GPU", "needs the internet")
PYTHON_COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:nice(?:\s+-n\s*\d+)?\s+)?(python3?)\s")
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=(\S+|\"[^\"]*\")$")
SCRIPT_COMMAND = re.compile(r"^\./scripts/[\w-]+$")
# What each route answers, for examples whose output the docs do not show: top-level keys, and
# the keys of each element of "results" (or "outputs").
SHAPES: dict[str, tuple[set[str], set[str]]] = {
    r"/health/ready$": ({"status", "ready"}, set()),
    r"/health/live$": ({"status", "live"}, set()),
    r"/v1/models$": ({"models"}, set()),
    r"/v1/models/[\w.-]+/classify$": (
        {"model", "method", "group", "results", "timing"},
        {"predictions", "transforms", "selected_transform", "lambda_net_entropy", "weight_entropy"},
    ),
    r"/v1/models/[\w.-]+/embed$": (
        {"model", "method", "group", "dim", "results", "timing"},
        {"embedding", "transforms"},
    ),
    r"/v1/models/[\w.-]+/generate$": (
        {"model", "method", "text", "tokens", "transforms", "finish_reason", "timing"},
        set(),
    ),
    r"/v1/models/[\w.-]+/translate$": ({"model", "method", "results", "timing"}, {"command", "actions", "transforms"}),
    r"/v1/models/[\w.-]+/act$": ({"model", "method", "results", "timing"}, {"q_values", "action", "transforms"}),
    r"/v2/models/[\w.-]+/infer$": ({"model_name", "outputs"}, {"name", "datatype", "shape", "data"}),
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def calls_server(self) -> bool:
        return bool(SERVER.search(self.text))


def read_blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(path, line, match.group(1), match.group(2)))
    return found


BLOCKS = read_blocks()


def logical_lines(script: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and blank lines dropped."""
    commands, current = [], ""
    for raw in script.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        command = re.sub(r"(^|\s)#.*$", "", current).strip()
        if command:
            commands.append(command)
        current = ""
    return commands


@dataclass
class ConsoleCommand:
    command: str
    shown: str  # the output the transcript shows ("" if none)


def console_commands(block: Block) -> list[ConsoleCommand]:
    commands: list[ConsoleCommand] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        assert line.startswith("$ "), f"{block.id}: a console block's line {line!r} is neither a command nor its output"
        command = line[2:]
        while command.endswith("\\"):
            i += 1
            command += "\n" + lines[i]
        i += 1
        shown = []
        while i < len(lines) and not lines[i].startswith("$ "):
            shown.append(lines[i])
            i += 1
        commands.append(ConsoleCommand(command, "\n".join(shown)))
    return commands


def shell_commands(block: Block) -> list[str]:
    if block.lang == "console":
        return [" ".join(logical_lines(c.command)) for c in console_commands(block)]
    return logical_lines(block.text)


def skip_reason(block: Block) -> str | None:
    if block.lang == "python":
        marker = SKIP_MARKER.match(block.text)
        return marker.group(1) if marker else None
    if block.lang in SHELL:
        for command in shell_commands(block):
            for reason, pattern in SKIP_KINDS.items():
                if pattern.search(command):
                    return reason
    return None


def runnable(lang: str, server: bool) -> list[Block]:
    return [b for b in BLOCKS if (b.lang in SHELL if lang == "shell" else b.lang == lang) and b.calls_server == server]


def params(blocks: list[Block], slow: re.Pattern | None = None) -> list:
    return [
        pytest.param(b, id=b.id, marks=[pytest.mark.slow] if slow is not None and slow.search(b.text) else [])
        for b in blocks
    ]


# ---------------------------------------------------------------- the working tree the examples run in


def tracked_and_untracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    return [name for name in out.split("\0") if name and (ROOT / name).is_file()]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            state[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return state


def changes(before: dict, after: dict) -> list[str]:
    return sorted(
        [f"left behind: {p}" for p in after.keys() - before.keys()]
        + [f"removed: {p}" for p in before.keys() - after.keys()]
        + [f"changed: {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the working tree (tracked and untracked files, not the ignored ones)."""
    copy = tmp_path_factory.mktemp("tree")
    for name in tracked_and_untracked_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    return copy


def example_env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def run_python(code: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-"], input=code, cwd=cwd, env=example_env(), capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------- not run, by design


SKIPPED = [b for b in BLOCKS if skip_reason(b) is not None]


@pytest.mark.parametrize("block", params(SKIPPED))
def test_example_skipped_by_design(block: Block) -> None:
    pytest.skip(f"{block.id}: by design, {skip_reason(block)}")


def test_examples_not_run_are_only_of_the_known_kinds() -> None:
    """Nothing is skipped silently: every example is either run, dry-run, or skipped for one of the
    known reasons; a skipped shell block holds a container, Kubernetes or Ray command, and a skipped
    Python block says why with the marker."""
    assert BLOCKS, "no examples found"
    for block in SKIPPED:
        reason = skip_reason(block)
        if block.lang == "python":
            assert reason.startswith(PYTHON_SKIP_REASONS), f"{block.id}: {reason!r} is not a reason to skip"
        else:
            assert reason in SKIP_KINDS, block.id
    kinds = {skip_reason(b) for b in SKIPPED}
    assert len(SKIPPED) <= 12 and kinds <= {*SKIP_KINDS, *(r for r in kinds if r.startswith(PYTHON_SKIP_REASONS))}
    ran = [b for b in BLOCKS if b.lang in SHELL | {"python"} and b not in SKIPPED]
    assert len(ran) > 3 * len(SKIPPED), "most examples run"


# ---------------------------------------------------------------- Python blocks without the server


@pytest.mark.parametrize(
    "block",
    params([b for b in runnable("python", server=False) if b not in SKIPPED], slow=re.compile(r"models=\[")),
)
def test_python_example_runs(block: Block, tree: Path) -> None:
    before = snapshot(tree)
    result = run_python(block.text, tree, timeout=600)
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout}\n{result.stderr}"
    assert not changes(before, snapshot(tree)), f"{block.id}: {changes(before, snapshot(tree))}"


# ---------------------------------------------------------------- shell blocks that start long jobs: parsed, not run


RECORDER = r"""
__record() { printf '%s\037' "$@" >> "$EXAMPLE_RECORD"; printf '\036' >> "$EXAMPLE_RECORD"; }
python() { __record python "$@"; }
python3() { __record python "$@"; }
nice() { while [ "$#" -gt 0 ] && [ "${1#-}" != "$1" ]; do [ "$1" = -n ] && shift; shift; done; "$@"; }
set -eu
"""

DRY_PARSE = r"""
import argparse, contextlib, io, json, os, runpy, sys
argvs = json.load(sys.stdin)

class Parsed(BaseException):
    pass

parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
depth = [0]

def stop_after(parse):  # parse, raising Parsed once the outermost call has parsed the command line
    def patched(self, args=None, namespace=None):
        depth[0] += 1
        try:
            result = parse(self, args, namespace)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            raise Parsed
        return result
    return patched

argparse.ArgumentParser.parse_args = stop_after(parse_args)
argparse.ArgumentParser.parse_known_args = stop_after(parse_known_args)
results = []
for argv in argvs:
    err = io.StringIO()
    sys.argv = list(argv)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:  # as `python script.py` does: the script's folder first on sys.path
                sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
                try:
                    runpy.run_path(argv[0], run_name="__main__")
                finally:
                    del sys.path[0]
        results.append("ran without parsing its arguments")
    except Parsed:
        results.append("")
    except SystemExit as exc:
        results.append(f"exit {exc.code}: {err.getvalue().strip()[-2000:]}")
    except BaseException as exc:
        results.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(results))
"""


def recorded_python_commands(block: Block, tree: Path) -> list[list[str]]:
    """The argv of every ``python`` command of a block, as bash expands it, recorded instead of run."""
    # Only blocks of python commands and variable assignments get here, and bash finds no program
    # at all (PATH leads nowhere): nothing but the recording functions can run.
    assert is_python_block(block), block.id
    record = Path(tempfile.mkstemp(prefix="example-record-")[1])
    try:
        result = subprocess.run(
            [shutil.which("bash") or "/bin/bash", "-c", RECORDER + block.text], cwd=tree, capture_output=True,
            text=True, timeout=60, env={"PATH": "/nonexistent", "HOME": str(tree), "EXAMPLE_RECORD": str(record)},
        )  # fmt: skip
        assert result.returncode == 0, f"{block.id}: {result.stderr}"
        calls = [call.split("\x1f")[:-1] for call in record.read_text().split("\x1e") if call]
    finally:
        record.unlink()
    return calls


def dry_parse(argvs: list[list[str]], cwd: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", DRY_PARSE], input=json.dumps(argvs), cwd=cwd, env=example_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


OFFLINE_SHELL = [b for b in runnable("shell", server=False) if b not in SKIPPED]


def is_python_block(block: Block) -> bool:
    commands = shell_commands(block)
    return any(PYTHON_COMMAND.match(c) for c in commands) and all(
        PYTHON_COMMAND.match(c) or ASSIGNMENT.match(c) for c in commands
    )


@pytest.fixture(scope="module")
def dry_parsed(tree: Path) -> dict[str, list[tuple[list[str], str]]]:
    """Every offline shell block's python commands with what their parser said ('' = parsed)."""
    calls = {b.id: recorded_python_commands(b, tree) for b in OFFLINE_SHELL if is_python_block(b)}
    argvs = [
        argv[1:] for block_calls in calls.values() for argv in block_calls if argv[1:2] != ["-m"] or argv[2] != "pytest"
    ]
    verdicts = iter(dry_parse(argvs, tree)) if argvs else iter(())
    return {
        block: [(argv, "" if argv[1:3] == ["-m", "pytest"] else next(verdicts)) for argv in block_calls]
        for block, block_calls in calls.items()
    }


@pytest.mark.parametrize("block", params(OFFLINE_SHELL))
def test_long_running_example_is_valid(block: Block, tree: Path, dry_parsed: dict) -> None:
    """Its commands are `./scripts/...` that exist, or python commands whose parser accepts them."""
    commands = shell_commands(block)
    assert commands, block.id
    if all(SCRIPT_COMMAND.match(c) for c in commands):
        for command in commands:
            assert os.access(ROOT / command, os.X_OK), f"{block.id}: {command} is not an executable script"
        return
    for command in commands:
        assert PYTHON_COMMAND.match(command) or ASSIGNMENT.match(command), (
            f"{block.id}: {command!r} is no kind of example this test knows (a server example, a python command, "
            "a script, or one skipped by design)"
        )
    recorded = dry_parsed[block.id]
    assert len(recorded) == sum(bool(PYTHON_COMMAND.match(c)) for c in commands), block.id
    for argv, verdict in recorded:
        assert argv[1] == "-m" or (ROOT / argv[1]).is_file(), f"{block.id}: {argv[1]} does not exist"
        if argv[1:3] == ["-m", "pytest"]:
            for name in argv[3:]:
                assert name.startswith("-") or (ROOT / name.split("::")[0]).exists(), f"{block.id}: no {name}"
            continue
        assert verdict == "", f"{block.id}: `{' '.join(argv)}` does not parse: {verdict}"


# ---------------------------------------------------------------- the server examples


CURL_WRAPPER = r"""
curl() {
  local f; f="$EXAMPLE_CALLS/$(date +%s%N)"
  printf '%s\n' "$@" > "$f.args"
  command curl "$@" -o "$f.body" -w '%{http_code}' > "$f.status"; local rc=$?
  [ -f "$f.body" ] && cat "$f.body"
  return $rc
}
set -o pipefail
"""


@dataclass
class Call:
    args: list[str]
    status: int
    body: str

    @property
    def url(self) -> str:
        return next(a for a in self.args if SERVER.search(a) or re.search(r"127\.0\.0\.1:\d+|localhost:\d+", a))

    @property
    def path(self) -> str:
        return re.sub(r"^(https?://)?[^/]+", "", self.url).split("?")[0]


def run_shell(
    script: str, tree: Path, port: int, timeout: float = 300
) -> tuple[subprocess.CompletedProcess, list[Call]]:
    calls_dir = Path(tempfile.mkdtemp(prefix="example-calls-"))
    try:
        result = subprocess.run(
            ["bash", "-c", CURL_WRAPPER + on_server(script, port)], cwd=tree, capture_output=True,
            text=True, timeout=timeout, env={**example_env(), "EXAMPLE_CALLS": str(calls_dir)},
        )  # fmt: skip
        calls = []
        for args in sorted(calls_dir.glob("*.args")):
            stem = args.with_suffix("")
            body = stem.with_suffix(".body")
            calls.append(
                Call(
                    args.read_text().splitlines(),
                    int(stem.with_suffix(".status").read_text() or 0),
                    body.read_text(errors="replace") if body.exists() else "",
                )
            )
    finally:
        shutil.rmtree(calls_dir)
    return result, calls


def keys_of(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys_of(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_of(v)}
    return set()


def check_shape(call: Call) -> list[str]:
    shape = next((shape for route, shape in SHAPES.items() if re.search(route, call.path)), None)
    if shape is None:
        if call.path == "/metrics":
            return [] if call.body.startswith("# HELP") else ["/metrics is not Prometheus text"]
        return [f"no documented shape for {call.path}"]
    top, per_item = shape
    try:
        answer = json.loads(call.body)
    except json.JSONDecodeError:
        return [f"{call.path} did not answer JSON: {call.body[:200]!r}"]
    problems = [f"{call.path}: no {key!r}" for key in sorted(top - set(answer))]
    for item in answer.get("results", answer.get("outputs", [])) if per_item else []:
        problems += [f"{call.path}: an item has no {key!r}" for key in sorted(per_item - set(item))]
    return problems


def shown_error_code(shown: str) -> str | None:
    match = re.match(r'\s*\{"error":\s*\{"code":\s*"(\w+)"', shown)
    return match.group(1) if match else None


def check_shown(shown: str, output: str) -> list[str]:
    """The output has what the transcript shows: its JSON keys, or (text) a line matching each shown
    line with any number in it."""
    if not shown.strip():
        return []
    if shown.lstrip().startswith(("{", "[")):
        try:
            actual = keys_of(json.loads(output))
        except json.JSONDecodeError:
            return [f"the transcript shows JSON, the command printed {output[:300]!r}"]
        return [f"no {key!r} in the answer" for key in sorted(set(re.findall(r'"(\w+)":', shown)) - actual)]
    problems = []
    for line in shown.splitlines():
        if line.strip() in {"", "..."}:
            continue
        pattern = re.sub(r"\\?-?\d+(?:\\\.\d+)?(?:e-?\d+)?", r"-?[\\d.e+-]+", re.escape(line.strip()))
        if not any(re.fullmatch(pattern, actual.strip()) for actual in output.splitlines()):
            problems.append(f"no output line like {line.strip()!r}")
    return problems


def has_fail_flag(command: str) -> bool:
    return bool(re.search(r"(?:^|\s)-[a-zA-Z]*f[a-zA-Z]*(?=\s)|--fail\b", command))


def model_names(text: str) -> set[str]:
    return (
        set(re.findall(r"/v[12]/models/([\w.-]+)/", text))
        | set(re.findall(r"--model[= ]([\w.-]+)", text))
        | set(re.findall(r"client\.(?:infer|get_model_metadata|is_model_ready)\(\s*\"([\w.-]+)\"", text))
        | set(re.findall(r"InferRequest\(\"([\w.-]+)\"", text))
    )


def server_models(blocks: list[Block]) -> list[str]:
    """The shipped models the examples call; a name that is not shipped may only be in an example
    that shows the error it gets."""
    shipped = {p.parent.name for p in (ROOT / "models").glob("*/model.yaml")}
    wanted, in_errors = set(), set()
    for block in blocks:
        steps = console_commands(block) if block.lang == "console" else [ConsoleCommand(block.text, "")]
        for step in steps:
            (in_errors if shown_error_code(step.shown) else wanted).update(model_names(step.command))
    assert wanted <= shipped, f"the examples call models that are not in models/: {wanted - shipped}"
    return sorted(wanted)


def on_server(text: str, port: int) -> str:
    """An example's localhost:8000 (HTTP) and :8001 (gRPC) as the ports of the examples' server."""
    return SERVER.sub(lambda m: f"{m[1]}:{port if m[2] == '8000' else GRPC_PORT[0]}", text)


def run_server_example(block: Block, tree: Path, port: int) -> list[str]:
    problems: list[str] = []
    if block.lang == "python":
        result = run_python(on_server(block.text, port), tree, timeout=300)
        if result.returncode != 0:
            problems.append(f"failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        return problems
    steps = console_commands(block) if block.lang == "console" else [ConsoleCommand(block.text, "")]
    for step in steps:
        error = shown_error_code(step.shown)
        result, calls = run_shell(step.command, tree, port)
        where = f"`{step.command.splitlines()[0][:90]}`"
        curls = [c for c in logical_lines(step.command) if re.search(r"(^|[|;&{]\s*)curl\s", c)]
        for command in curls:
            if error is None and not has_fail_flag(command):
                problems.append(f"{where}: a curl example that should succeed needs -f (or --fail-with-body)")
            if error is not None and has_fail_flag(command):
                problems.append(f"{where}: shows an error on purpose, so it cannot use -f")
        if error is None:
            if result.returncode != 0:
                problems.append(
                    f"{where} exited {result.returncode}:\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}"
                )
            problems += [f"{where}: HTTP {c.status} {c.body[:300]}" for c in calls if not 200 <= c.status < 300]
            problems += [f"{where}: {p}" for c in calls if 200 <= c.status < 300 for p in check_shape(c)]
        else:
            if len(calls) != 1 or calls[0].status < 400:
                problems.append(f"{where}: shows the error {error!r} but answered {[c.status for c in calls]}")
            elif json.loads(calls[0].body).get("error", {}).get("code") != error:
                problems.append(f"{where}: shows the error {error!r} but answered {calls[0].body[:300]}")
        if result.returncode == 0 or error is not None:
            problems += [f"{where}: {p}" for p in check_shown(step.shown, result.stdout)]
    return problems


SERVER_EXAMPLES = [b for b in BLOCKS if b.calls_server and b not in SKIPPED and b.lang in SHELL | {"python"}]


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    models = server_models(SERVER_EXAMPLES)
    port, grpc_port = free_port(), free_port()
    GRPC_PORT[:] = [grpc_port]
    # torch, no warmup: no ONNX export and no warmup batches, so that the server is ready soonest
    with start_server(ROOT / "models", port, "--models", ",".join(models), "--no-warmup",
                      "--grpc-port", str(grpc_port)) as process:  # fmt: skip
        wait_ready(f"http://127.0.0.1:{port}", process, timeout=400)
        yield port


@pytest.mark.slow
def test_every_server_example_answers(server: int, tree: Path) -> None:
    """In document order (the metrics transcript counts the requests before it), one real server."""
    assert len(SERVER_EXAMPLES) >= 8
    problems = []
    for block in SERVER_EXAMPLES:
        before = snapshot(tree)
        problems += [f"{block.id}: {p}" for p in run_server_example(block, tree, server)]
        problems += [f"{block.id}: {p}" for p in changes(before, snapshot(tree))]
    assert not problems, "\n".join(problems)


def test_server_examples_start_no_long_job() -> None:
    """A server example is curl (with the shell around it), `python -m app play` or a Python client:
    it trains nothing, benchmarks nothing and starts no second server."""
    for block in SERVER_EXAMPLES:
        assert not re.search(r"python3? -m app (?!play\b)|python3? bench/|scripts/", block.text), block.id

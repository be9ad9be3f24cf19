"""Schema fuzzing with schemathesis against a running server of every task's tiny model, with every
check: no 5xx, documented statuses, content types and bodies (the event stream event by event),
every schema-valid request accepted and every schema-violating one refused. GET /openapi.json
names each served model's path with its own limits, so the last two hold for every model.

tests/test_api_schema_limits.py checks the same document at its boundaries, fast."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.apptools import ROOT, free_port, set_limits, start_server, wait_ready
from tests.tasktools import write_every_task

pytestmark = pytest.mark.slow

# schemathesis' configuration beside its command line (--checks all).
CONFIG = f"""
# Positive cases carry real images: a schema can say an image is base64, not that it decodes.
hooks = "{ROOT / "tests" / "schemathesis_hooks.py"}"

# A request over one of the size limits the document states is refused with 413 Content Too Large.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

# The Open Inference Protocol answers 400 for what no JSON Schema can state: a tensor whose shape
# does not multiply out to its data's elements, a binary body (a JSON header whose length is in a
# header, then the tensors' bytes) that does not hold together. Every other refusal of a valid
# request (a limit, 413; a wrong media type, 415; ...) still fails the check.
[[operations]]
include-path-regex = "^/v2/models/[^/]+/infer$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
"""


def test_schemathesis_finds_no_failure_with_every_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli = shutil.which("schemathesis") or shutil.which("st")
    assert cli, "schemathesis is a test dependency (pip install -e '.[test]')"
    models = write_every_task(tmp_path / "models")
    # Small request limits keep the largest valid requests cheap. A prompt's tokens (counted by
    # the tokenizer) are a limit no schema can state: at 16 characters a prompt holds at most 64
    # bytes, so at most the tiny model's 64 tokens, and the character limit the document states
    # is the one that binds.
    set_limits(monkeypatch, "classify", max_images=4)
    set_limits(monkeypatch, "embed", max_images=4)
    set_limits(monkeypatch, "translate", max_commands=8)
    set_limits(monkeypatch, "act", max_observations=8)
    set_limits(monkeypatch, "generate", max_prompt_chars=16)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    port = free_port()
    with start_server(models, port, "--max-batch-size", "4") as process:
        wait_ready(f"http://127.0.0.1:{port}", process)
        result = subprocess.run(
            [cli, "--config-file", str(config), "run", f"http://127.0.0.1:{port}/openapi.json",
             "--checks", "all", "--max-examples", "40", "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=420, cwd=tmp_path,  # its cache dir goes there
        )  # fmt: skip
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:] + process.output()[-2000:]
    cases = re.search(r"(\d+) generated, (\d+) passed\n", result.stdout)  # and nothing failed or erred
    assert cases and cases[1] == cases[2] and int(cases[1]) > 150, result.stdout[-3000:]
    # every operation of the document was tested (the models' own paths are most of them)
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", result.stdout)
    assert selected and len(set(selected.groups())) == 1 and int(selected[1]) >= 15, result.stdout[-3000:]

"""Schema fuzzing with schemathesis against the running server: zero 5xx, documented statuses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.apptools import free_port, start_server, wait_ready

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_error(tiny_models_dir: Path) -> None:
    cli = shutil.which("schemathesis") or shutil.which("st")
    assert cli, "schemathesis is a test dependency (pip install -e '.[test]')"
    port = free_port()
    process = start_server(tiny_models_dir, port, "--max-batch-size", "4")
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        result = subprocess.run(
            [cli, "run", f"http://127.0.0.1:{port}/openapi.json",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
             "--max-examples", "40", "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=400, cwd=tiny_models_dir,  # its cache dir goes there
        )  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout

"""Start the real app: in process (with its lifespan) behind an httpx AsyncClient, or as a
`python -m app serve` subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.config import Settings
from app.server import create_app

ROOT = Path(__file__).resolve().parent.parent


def set_limits(monkeypatch: pytest.MonkeyPatch, task: str, **limits: Any) -> None:
    """Task limits for the servers this test starts, through their env vars (EQUISERVE_<TASK>_<LIMIT>)."""
    for name, value in limits.items():
        monkeypatch.setenv(f"EQUISERVE_{task.upper()}_{name.upper()}", str(value))


def with_limits(model: Any, **limits: Any) -> Any:
    """A copy of a loaded model whose spec carries these limits (as ``limits:`` in its model.yaml would)."""
    copy = __import__("copy").copy(model)
    copy.spec = model.spec.model_copy(update={"limits": model.spec.limits_type(**limits)})
    return copy


def make_settings(models_dir: Path, **overrides: Any) -> Settings:
    # torch runs the tiny test models, so fault-injection tests can patch torch modules and no
    # start pays for an export; tests/test_backbones_onnx_cache.py, the real-model tests and
    # the bench smoke runs cover the onnxruntime default.
    defaults: dict[str, Any] = {
        "models_dir": models_dir, "max_batch_size": 8, "max_wait_ms": 5, "device": "cpu", "runtime": "torch",
    }  # fmt: skip
    return Settings(**{**defaults, **overrides})


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client, app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess(subprocess.Popen):
    """``python -m app serve`` whose output goes to a file: a pipe nobody reads would fill up
    and block the server's logging (and with it the server)."""

    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_all(self) -> None:
        """SIGKILL to the server and everything it started (its own session: worker processes, a Ray
        cluster's daemons and actors), even where the server itself has already gone; then reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.wait()

    def __exit__(self, *exc_info: object) -> None:
        """Leaving ``with start_server(...)``: whatever still runs is killed (Popen's own exit would
        wait for it forever), then reaped."""
        self.kill_all()
        super().__exit__(*exc_info)


def start_server(models_dir: Path, port: int, *extra: str) -> ServerProcess:
    env = {"EQUISERVE_RUNTIME": "torch", **os.environ, "EQUISERVE_LOG_LEVEL": "info"}
    log_path = Path(tempfile.mkstemp(prefix="equiserve-", suffix=".log")[1])
    with log_path.open("w") as log:
        process = ServerProcess(
            [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--models-dir", str(models_dir), "--device", "cpu", *extra],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # one process group to kill, whatever the server started
        )  # fmt: skip
    process.log_path = log_path
    return process


def wait_ready(base: str, process: ServerProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early:\n{process.output()}")
        try:
            if httpx.get(f"{base}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")

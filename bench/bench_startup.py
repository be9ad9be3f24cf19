"""Benchmark: how long ``python -m app serve`` takes to be ready, the first time and again (CPU).

Each run starts the server on 127.0.0.1 with the given models (default: every default model of
the repository, as ``scripts/serve`` serves them) and records, from the moment the process is
started:

* **listening**: the first ``GET /health/live`` answered (the port opens before models load);
* **ready**: the first ``GET /health/ready`` = 200 (every model loaded and warmed up);
* each model's own load time, from its ``loaded <name> ... in <s> s`` log line.

The first run uses an empty ONNX cache (``EQUISERVE_ONNX_CACHE_DIR`` in a fresh folder): each
image model is exported once, as on a newcomer's first start; the later runs reuse that cache,
as every later start does. Results go to ``bench/results/startup_cpu.json`` and a Markdown
table beside it.

Run from the repository root (minutes: one cold and ``--warm-runs`` warm starts)::

    python bench/bench_startup.py [--models imagenet-effnet-c4,smollm2-fair] [--warm-runs 2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import httpx
from benchlib import REPO_ROOT, RESULTS_DIR

LOADED = re.compile(r"loaded (?P<name>\S+) \(.*\) in (?P<seconds>[0-9.]+) s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(models_dir: Path, models: str | None, cache_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Start a server, wait until it is ready, stop it: the times from the process start."""
    port = free_port()
    env = {**os.environ, "EQUISERVE_ONNX_CACHE_DIR": str(cache_dir), "EQUISERVE_LOG_LEVEL": "info"}
    if models:
        env["EQUISERVE_MODELS"] = models
    command = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--models-dir", str(models_dir)]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        listening = ready = None
        try:
            while ready is None and time.perf_counter() - started < timeout_s:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read()[-4000:]}")
                try:
                    if listening is None:
                        httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1)
                        listening = time.perf_counter() - started
                    if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                        ready = time.perf_counter() - started
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        finally:
            process.terminate()
            process.wait(timeout=60)
        log.seek(0)
        output = log.read()
    if ready is None:
        raise RuntimeError(f"not ready within {timeout_s} s:\n{output[-4000:]}")
    loads = {m["name"]: float(m["seconds"]) for m in LOADED.finditer(output)}
    return {"listening_s": round(listening or 0.0, 2), "ready_s": round(ready, 2), "model_load_s": loads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="EQUISERVE_MODELS (default: every default model)")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--warm-runs", type=int, default=2, help="starts with the ONNX cache of the first")
    parser.add_argument("--timeout-s", type=float, default=900)
    benchlib.add_report_args(parser, RESULTS_DIR / "startup_cpu.json")
    args = parser.parse_args(argv)

    started, load_start = benchlib.utc_now(), benchlib.load_average()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="equiserve-onnx-") as cache:
        for i in range(1 + args.warm_runs):
            kind = "first (empty ONNX cache)" if i == 0 else "warm (cached exports)"
            run = {"start": kind, **one_start(args.models_dir, args.models, Path(cache), args.timeout_s)}
            print(f"{kind}: listening {run['listening_s']} s, ready {run['ready_s']} s", file=sys.stderr)
            runs.append(run)
    report = {
        **benchlib.report_header("startup", started, args.note, load_start),
        "models": args.models or "every default model",
        "runs": runs,
    }
    columns = ["start", "listening (s)", "ready (s)", *sorted(runs[0]["model_load_s"])]
    rows = [
        [run["start"], benchlib.fmt(run["listening_s"]), benchlib.fmt(run["ready_s"]),
         *(benchlib.fmt(run["model_load_s"].get(name)) for name in columns[3:])]
        for run in runs
    ]  # fmt: skip
    benchlib.print_table("python -m app serve: seconds from the process start", columns, rows)
    markdown = (
        f"# Start-up (CPU)\n\n`{report['command']}`; {report['machine']['cpu_model']}, {args.note}.\n\n"
        "Seconds from the process start; a model's column is its own load and warmup.\n\n"
        + benchlib.markdown_table(columns, rows)
        + "\n"
    )
    benchlib.write_report(args.out, report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

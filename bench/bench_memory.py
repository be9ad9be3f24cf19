"""Benchmark: memory of one server process (a replica) per model set, idle and under load (CPU).

Issue #17, item 6. For each model set:

1. **imports**: a fresh ``python`` builds the ``Engine`` for the set (no HTTP), starts it and
   reports its ``VmRSS`` after ``import torch`` alone and after the start, and which heavy
   optional modules (open_clip, timm, transformers, gymnasium, ...) ended up imported;
2. **server**: ``python -m app serve --models <set>`` on 127.0.0.1: ``VmRSS`` once ready and
   idle (the median of a few samples after ``--settle-s``: the server trims its heap after
   ``EQUISERVE_MEMORY_TRIM_IDLE_S`` idle), then under closed-loop load with real JPEGs on the
   set's first image model (``VmRSS`` sampled every 50 ms: its peak), the process's
   high-water mark ``VmHWM`` (which includes the start: exports, quantization), and the idle
   ``VmRSS`` again after the load.

Results go to ``bench/results/memory_cpu.json`` and a Markdown table beside it. Target (issue
#17, reported, not asserted): idle <= 1 GB for the default image models.

Run from the repository root (~3 min on 2 shared cores)::

    python bench/bench_memory.py [--sets imagenet-effnet-c4 imagenet-effnet-c4,fashion-effnet-c4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchlib
import loadgen
import numpy as np
from benchlib import REPO_ROOT, RESULTS_DIR

DEFAULT_SETS = ("imagenet-effnet-c4", "imagenet-effnet-c4,fashion-effnet-c4")
HEAVY_MODULES = ("open_clip", "timm", "transformers", "gymnasium", "onnxruntime", "onnx", "torchvision", "ray")
TARGET_IDLE_MIB = 1024.0

# Runs in a fresh interpreter: what a replica holds with no HTTP in front.
PROBE = """
import asyncio, json, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
base = rss()
import torch
after_torch = rss()
from app.config import Settings
from app.engine.engine import Engine
models = sys.argv[1].split(',')
extra = {'models_dir': sys.argv[3]} if sys.argv[3] else {}
async def main():
    engine = Engine(Settings(models=models, device='cpu', log_level='warning', **extra))
    await engine.start()
    started = rss()
    await engine.stop()
    return started
started = asyncio.run(main())
print(json.dumps({'python_mib': base, 'after_import_torch_mib': after_torch, 'after_engine_start_mib': started,
                  'imported': sorted(m for m in sys.argv[2].split(',') if m in sys.modules)}))
"""


def probe(models: str, models_dir: Path | None) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, models, ",".join(HEAVY_MODULES), str(models_dir or "")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}


def status_mib(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def idle_mib(pid: int, samples: int = 5, interval_s: float = 0.4) -> float | None:
    values = []
    for _ in range(samples):
        value = status_mib(pid, "VmRSS")
        if value is not None:
            values.append(value)
        time.sleep(interval_s)
    return round(float(np.median(values)), 1) if values else None


def serve(models: str, args: argparse.Namespace, photos: Sequence[loadgen.Photo]) -> dict[str, Any]:
    first = models.split(",")[0]
    server = loadgen.equiserve_server(None, model=models, models_dir=args.models_dir, threads=args.threads)
    server.startup_timeout_s = 900
    with server:
        at_ready = status_mib(server.pid, "VmRSS")
        time.sleep(args.settle_s)
        idle = idle_mib(server.pid)
        hwm_start = status_mib(server.pid, "VmHWM")
        peak = [idle or 0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                value = status_mib(server.pid, "VmRSS")
                if value is not None:
                    peak[0] = max(peak[0], value)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        templates = loadgen.photo_templates(photos, first)
        result = asyncio.run(
            loadgen.run_closed_loop(
                server.base_url,
                templates,
                concurrency=args.concurrency,
                duration_s=args.duration,
                warmup_s=min(1.0, args.duration / 3),
                timeout_s=120,
                id_prefix=f"mem-{first}",
            )
        )
        done.set()
        sampler.join()
        summary = result.summary()
        time.sleep(args.settle_s)
        after = idle_mib(server.pid)
        return {
            "startup_s": round(server.startup_s or 0.0, 1),
            "rss_at_ready_mib": at_ready,
            "idle_rss_mib": idle,
            "hwm_after_start_mib": hwm_start,
            "peak_rss_under_load_mib": round(peak[0], 1),
            "hwm_mib": status_mib(server.pid, "VmHWM"),
            "idle_rss_after_load_mib": after,
            "load": {
                "model": first,
                "concurrency": args.concurrency,
                "throughput_rps": summary["throughput_rps"],
                "status_counts": summary["status_counts"],
            },
        }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Memory per server process (one replica), CPU",
        "",
        f"`{report['command']}` on {m['cpu_model']} ({m['usable_cpus']} shared cores), {report['timestamp']}, "
        f"load average {m['load_average_start']} -> {m['load_average_end']}. MiB of `VmRSS`; load: closed loop, "
        f"concurrency {report['config']['concurrency']}, {report['config']['duration_s']:.0f} s of real JPEGs.",
        "",
    ]
    rows = []
    for entry in report["sets"]:
        p, s = entry["probe"], entry["server"]
        rows.append(
            [
                f"`{entry['models']}`",
                benchlib.fmt(p["after_import_torch_mib"], 0),
                benchlib.fmt(p["after_engine_start_mib"], 0),
                benchlib.fmt(s["rss_at_ready_mib"], 0),
                benchlib.fmt(s["idle_rss_mib"], 0),
                benchlib.fmt(s["peak_rss_under_load_mib"], 0),
                benchlib.fmt(s["hwm_mib"], 0),
                benchlib.fmt(s["idle_rss_after_load_mib"], 0),
                ", ".join(p["imported"]) or "-",
            ]
        )
    columns = ["models", "import torch", "engine started", "server ready", "server idle", "peak under load", "VmHWM",
               "idle after load", "heavy modules imported"]  # fmt: skip
    lines.append(benchlib.markdown_table(columns, rows))
    verdicts = ", ".join(f"`{e['models']}` {'met' if e['idle_target_met'] else 'MISSED'}" for e in report["sets"])
    lines += ["", f"Target: server idle <= {TARGET_IDLE_MIB:.0f} MiB: {verdicts}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), help="comma-separated model sets")
    parser.add_argument("--threads", type=int, default=None, help="torch/onnxruntime threads in the server")
    parser.add_argument("--models-dir", type=Path, default=None, help="model repository (default: models/)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per set")
    parser.add_argument("--settle-s", type=float, default=3.0, help="seconds idle before sampling")
    benchlib.add_report_args(parser, RESULTS_DIR / "memory_cpu.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = benchlib.utc_now()
    load_start = benchlib.load_average()
    photos = loadgen.load_photos()
    sets = []
    for models in args.sets:
        print(f"[{models}] in-process probe ...", file=sys.stderr, flush=True)
        entry: dict[str, Any] = {"models": models, "probe": probe(models, args.models_dir)}
        print(f"[{models}] server ...", file=sys.stderr, flush=True)
        entry["server"] = serve(models, args, photos)
        idle = entry["server"]["idle_rss_mib"]
        entry["idle_target_met"] = idle is not None and idle <= TARGET_IDLE_MIB
        print(f"[{models}] {entry}", file=sys.stderr, flush=True)
        sets.append(entry)
    report = benchlib.report_header("bench_memory", started, args.note, load_start)
    report["config"] = {"threads": args.threads, "concurrency": args.concurrency, "duration_s": args.duration}
    report["sets"] = sets
    md = markdown(report)
    benchlib.write_report(args.out, report, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Helpers every benchmark script shares: machine description, statistics, JSON reports, tables.

Kept apart from the scripts so that each one records the same machine facts (the load
average above all: this machine is shared and other people's jobs run during our runs)
and computes percentiles the same way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` finds `app` without installing it
    sys.path.insert(0, str(REPO_ROOT))

from app.runtime.machine import cpu_model, usable_cpus  # noqa: E402


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare numbers across runs; torch is imported lazily."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname_is_shared": True,
    }
    try:
        import torch

        info["torch_version"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda_version"] = torch.version.cuda
    except ImportError:
        pass
    for env in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if env in os.environ:
            info[env] = os.environ[env]
    return info


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def command_line() -> str:
    return shlex.join([sys.executable, *sys.argv])


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


CONFIDENCE = 0.95


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, sample std and the Student-t interval of the mean over seeds. A bootstrap over 3-5 seeds
    would be far too narrow (it never sees more spread than the few values have); the t-interval
    accounts for estimating the std from so few. One value: no std, no interval."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "values": x.tolist(), "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / float(np.sqrt(n))
    return {"n": n, "values": x.tolist(), "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def paired(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The per-seed differences a − b and their t-interval. ``separated``: the interval excludes 0
    (None with one seed). Pairing removes what both share in a seed (split, test elements)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} values")
    out = t_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), confidence)
    out["separated"] = None if out["ci_low"] is None else bool(out["ci_low"] > 0 or out["ci_high"] < 0)
    return out


def latency_summary_ms(latencies_s: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/mean/max in milliseconds of a list of seconds."""
    ms = np.asarray(latencies_s, dtype=float) * 1e3
    if not len(ms):
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "max_ms": round(float(ms.max()), 2),
    }


SHARED_MACHINE_NOTE = "shared 2-core machine: other engineers' jobs run concurrently"


def add_report_args(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """``--note`` (what to know about the machine, kept in the report) and ``--out`` (the JSON file)."""
    parser.add_argument("--note", default=SHARED_MACHINE_NOTE, help="kept in the report: the machine's state")
    parser.add_argument("--out", type=Path, default=default_out, help="the JSON results file")


def report_header(benchmark: str, started: dt.datetime, note: str, load_start: list[float] | None) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round((utc_now() - started).total_seconds(), 1),
        "command": command_line(),
        "note": note,
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": load_average()},
    }


def dumps_report(value: Any, indent: int = 0) -> str:
    """JSON indented by 2 like ``json.dumps(indent=2)``, but a list of plain values (a curve, a
    load average) stays on one line: results with per-episode curves stay readable and small."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict) and value:
        items = (
            f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {dumps_report(v, indent + 2)}" for k, v in value.items()
        )
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return "[\n" + ",\n".join(f"{inner}{dumps_report(v, indent + 2)}" for v in value) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_report(report) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def write_report(path: Path, report: dict[str, Any], markdown: str) -> None:
    """``path`` (JSON) and the same name with ``.md`` (the table a human reads)."""
    write_json(path, report)
    path.with_suffix(".md").write_text(markdown)


def fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> None:
    """A rich table (plain text when rich is missing); the first column is left-aligned."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(row))
        return
    table = Table(title=title, title_justify="left", caption=caption or None, caption_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The same rows as Markdown, for pasting into bench/README.md."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def worktree(revision: str) -> Path:
    """A checkout of ``revision`` (a git worktree under the system's temp folder, made once),
    to run an earlier equiserve beside this one in the same benchmark run."""
    import subprocess
    import tempfile

    commit = subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"equiserve-{commit}"
    if not (path / "app").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=REPO_ROOT, check=True)
    return path

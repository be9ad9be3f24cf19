"""Benchmark: equiserve through Ray Serve against the plain server, same machine, same run (CPU).

Issue 16, item 4. At the same CPU budget (the machine's cores, here 2), one run measures:

* ``plain``: ``python -m app serve`` (one process, ``--torch-threads`` = the budget);
* ``ray-1``: ``serve --ray --replicas 1 --replica-cpus <budget>`` (one replica, same threads);
* ``ray-2``: ``serve --ray --replicas 2 --replica-cpus <budget/2>`` (two replicas, half each);
* ``plain-half-threads``: the plain server with a replica's thread count of ray-2, which
  tells the thread count's share of a difference from Ray's;
* ``plain`` again at the end: how much the shared machine drifted during the run.

Each segment is the closed-loop load generator (bench/loadgen.py) at one concurrency with real
JPEG photos (EfficientNet-Lite0, group c4, equitune). Reported: throughput, p50/p99 and their
ratios to the plain server (mean of its two segments), and ray-2 / ray-1. With 2 cores, two
replicas do not add compute; they split it, so these ratios mostly measure what Ray's proxy,
its routing and a second copy of the model cost, not scaling.

Ray keeps its traffic on loopback only inside a network namespace with just ``lo`` up: the
script re-runs itself through ``unshare --net`` (root) unless it already runs in one.

    python bench/bench_ray.py [--concurrency 16] [--duration 20] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchlib
import loadgen
from benchlib import RESULTS_DIR

DEFAULT_OUT = RESULTS_DIR / "ray_cpu.json"
IN_NETNS = "EQUISERVE_BENCH_NETNS"


def in_network_namespace(argv: Sequence[str]) -> int:
    """Run this script again in a fresh network namespace with only loopback up."""
    if shutil.which("unshare") is None:
        raise SystemExit("needs unshare (util-linux) and root: Ray must stay on loopback")
    command = "ip link set lo up && exec " + " ".join(map(shlex_quote, [sys.executable, __file__, *argv]))
    env = {**os.environ, IN_NETNS: "1"}
    return subprocess.run(["unshare", "--net", "sh", "-c", command], env=env).returncode


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def segments(cpus: int) -> list[tuple[str, list[str]]]:
    half = max(cpus / 2, 0.5)
    return [
        ("plain", ["--torch-threads", str(cpus)]),
        ("ray-1", ["--ray", "--replicas", "1", "--replica-cpus", str(cpus)]),
        ("ray-2", ["--ray", "--replicas", "2", "--replica-cpus", str(half)]),
        ("plain-half-threads", ["--torch-threads", str(max(1, cpus // 2))]),
        ("plain", ["--torch-threads", str(cpus)]),
    ]


def run_segment(name: str, flags: list[str], args: argparse.Namespace, photos: list[loadgen.Photo]) -> dict[str, Any]:
    server = loadgen.equiserve_server(None, *flags, model=args.model, name=name)
    server.startup_timeout_s = 600  # Ray, then every replica loads and warms up the model
    templates = loadgen.photo_templates(photos, args.model)
    print(f"{name}: starting {' '.join(flags)}", file=sys.stderr)
    with server:
        cpu0 = server.cpu_s()
        result = asyncio.run(
            loadgen.run_closed_loop(
                server.base_url, templates, concurrency=args.concurrency, duration_s=args.duration,
                warmup_s=args.warmup, timeout_s=60,
            )
        )  # fmt: skip
        cpu = server.cpu_s() - cpu0
        rss_mib = (server.rss_kib(tree=True) or 0) / 1024
    summary = result.summary()
    summary["server_cpu_s_per_ok_request"] = round(cpu / max(len([r for r in result.records if r.status == 200]), 1), 4)
    print(f"{name}: {summary['throughput_rps']} req/s, {summary['status_counts']}", file=sys.stderr)
    return {
        "name": name,
        "flags": flags,
        "startup_s": round(server.startup_s or 0, 1),
        "server_rss_mib": round(rss_mib),
        "summary": summary,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def analyse(runs: list[dict[str, Any]]) -> dict[str, Any]:
    plain = [r["summary"] for r in runs if r["name"] == "plain"]
    by_name = {r["name"]: r["summary"] for r in runs if r["name"] != "plain"}

    def mean(key: str, lat: bool = False) -> float:
        values = [s["latency"][key] if lat else s[key] for s in plain]
        return sum(values) / len(values)

    base = {
        "throughput_rps": mean("throughput_rps"),
        "p50_ms": mean("p50_ms", True),
        "p99_ms": mean("p99_ms", True),
        "cpu_s_per_request": mean("server_cpu_s_per_ok_request"),
    }
    out: dict[str, Any] = {"plain_mean": {k: round(v, 2) for k, v in base.items()}}
    for name, s in by_name.items():
        out[f"{name}_vs_plain"] = {
            "throughput": ratio(s["throughput_rps"], base["throughput_rps"]),
            "p50": ratio(s["latency"]["p50_ms"], base["p50_ms"]),
            "p99": ratio(s["latency"]["p99_ms"], base["p99_ms"]),
            "cpu_per_request": ratio(s["server_cpu_s_per_ok_request"], base["cpu_s_per_request"]),
        }
    if {"ray-1", "ray-2"} <= by_name.keys():
        out["ray2_vs_ray1_throughput"] = ratio(by_name["ray-2"]["throughput_rps"], by_name["ray-1"]["throughput_rps"])
    if {"ray-2", "plain-half-threads"} <= by_name.keys():  # same threads per engine: what Ray itself costs
        out["ray2_vs_plain_half_threads_throughput"] = ratio(
            by_name["ray-2"]["throughput_rps"], by_name["plain-half-threads"]["throughput_rps"]
        )
    out["plain_drift_throughput"] = ratio(plain[-1]["throughput_rps"], plain[0]["throughput_rps"])
    return out


COLUMNS = ("segment", "req/s", "p50 ms", "p99 ms", "CPU s/req", "vs plain: req/s", "p50", "p99", "CPU/req",
           "mean batch", "statuses", "startup s", "RSS MiB")  # fmt: skip


def table_rows(runs: list[dict[str, Any]], analysis: dict[str, Any]) -> list[list[str]]:
    rows = []
    for i, run in enumerate(runs):
        s, r = run["summary"], analysis.get(f"{run['name']}_vs_plain", {})
        label = run["name"] if run["name"] != "plain" else f"plain ({'first' if i == 0 else 'last'})"
        rows.append([
            label, benchlib.fmt(s["throughput_rps"], 2), benchlib.fmt(s["latency"]["p50_ms"]),
            benchlib.fmt(s["latency"]["p99_ms"]), benchlib.fmt(s["server_cpu_s_per_ok_request"], 3),
            benchlib.fmt(r.get("throughput"), 2), benchlib.fmt(r.get("p50"), 2), benchlib.fmt(r.get("p99"), 2),
            benchlib.fmt(r.get("cpu_per_request"), 2), benchlib.fmt(s["mean_batch_size"], 2),
            " ".join(f"{k}:{v}" for k, v in s["status_counts"].items()), benchlib.fmt(run["startup_s"]),
            str(run["server_rss_mib"]),
        ])  # fmt: skip
    return rows


def markdown(report: dict[str, Any]) -> str:
    m, a = report["machine"], report["analysis"]
    return "\n".join([
        "# Ray Serve vs the plain server (CPU)",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} cores (shared; load average {m['load_average_start']} at the "
        f"start, {m['load_average_end']} at the end); {report['timestamp']}; {report['duration_s']} s. "
        f"Command: `{report['command']}`",
        "",
        f"Closed loop, concurrency {report['config']['concurrency']}, {report['config']['duration_s']} s per segment "
        f"({report['config']['warmup_s']} s warm-up left out), model {report['config']['model']} (equitune), real "
        "JPEG photos; the same CPU budget for every segment. Ratios are against the mean of the two plain segments.",
        "",
        benchlib.markdown_table(COLUMNS, table_rows(report["runs"], a)),
        "",
        f"ray-2 / ray-1 throughput: {benchlib.fmt(a.get('ray2_vs_ray1_throughput'), 2)}; ray-2 / plain with the "
        f"same threads per engine: {benchlib.fmt(a.get('ray2_vs_plain_half_threads_throughput'), 2)}; "
        "plain last / first: "
        f"{benchlib.fmt(a['plain_drift_throughput'], 2)} (drift of the shared machine).",
        "",
        report["note"],
        "",
    ])  # fmt: skip


NOTE = (
    "On {cpus} cores two replicas split the same cores (each with half the threads) rather than add compute, so "
    "ray-2 / ray-1 and the ratios to the plain server measure Ray Serve's overhead (its HTTP proxy, routing through "
    "a replica actor, a second model copy) and the effect of threads per engine, not how Ray scales across machines. "
    "On a shared machine requests/s also depend on how much CPU the scheduler gives each server while other jobs "
    "run; server CPU seconds per answered request (all its processes, Ray's included) do not, and say what each "
    "answer costs."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=loadgen.DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per segment")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)), help="the CPU budget")
    parser.add_argument("--quick", action="store_true", help="8 s segments (a smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--render", action="store_true", help="only rewrite the table (.md) from --out's JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.out.read_text())
        report["note"] = NOTE.format(cpus=report["config"]["cpus"])
        report["analysis"] = analyse(report["runs"])
        benchlib.write_report(args.out, report, markdown(report))
        return 0
    if os.environ.get(IN_NETNS) != "1":
        return in_network_namespace(argv)
    if args.quick:
        args.duration, args.warmup = 8.0, 2.0
    started, load_start = benchlib.utc_now(), benchlib.load_average()
    photos = loadgen.load_photos()
    runs = [run_segment(name, flags, args, photos) for name, flags in segments(args.cpus)]
    analysis = analyse(runs)
    note = NOTE.format(cpus=args.cpus)
    report = {
        **benchlib.report_header("bench_ray", started, note, load_start),
        "config": {
            "model": args.model,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "cpus": args.cpus,
        },
        "runs": runs,
        "analysis": analysis,
    }
    benchlib.write_report(args.out, report, markdown(report))
    benchlib.print_table("Ray Serve vs the plain server", COLUMNS, table_rows(runs, analysis), note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

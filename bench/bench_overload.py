"""Benchmark: ten times the sustainable rate against equiserve, and what is left afterwards.

Issue #7, item 3. A server under overload must shed load (429 with Retry-After) rather than
queue without bound, keep the latency of what it accepts bounded, give every request
exactly one answer, and return to its baseline memory once the storm is over. Steps:

1. start ``python -m app serve`` (its default settings unless ``--server-args``) and read
   its baseline ``VmRSS`` (``/proc/<pid>/status``) once it is ready and idle;
2. measure the sustainable rate briefly: closed loop at ``--calibrate-concurrency`` for
   ``--calibrate-s`` seconds; its throughput is the rate the server sustains;
3. overload: an open loop at ``--factor`` × that rate for ``--duration`` seconds (30),
   every request with its own ``X-Request-ID``, at most ``--max-inflight`` in flight; the
   server's RSS is sampled every second;
4. afterwards: RSS sampled for ``--settle-s`` seconds (back to baseline?), a short probe at
   concurrency 1 (does it answer normally again?), and the server's own request counters
   from ``/metrics`` compared with the client's tally.

The tally proves "exactly one answer per request": every id sent came back once in the
``X-Request-ID`` header, the statuses add up (sent = 200 + 429 + others), there were no
transport errors or timeouts, and the server counted as many classify requests as were sent.

Run from the repository root (~2.5 min with the defaults)::

    python bench/bench_overload.py [--factor 10] [--duration 30] [--server-args --queue-size 64]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchlib
import httpx
import loadgen
from benchlib import RESULTS_DIR

DEFAULT_OUT = RESULTS_DIR / "overload_cpu.json"
REQUESTS_TOTAL = re.compile(r"^equiserve_requests_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$", re.M)


def server_request_counts(base_url: str, model: str) -> dict[str, float]:
    """``equiserve_requests_total`` of the classify endpoint per status, from ``/metrics``."""
    text = httpx.get(base_url + "/metrics", timeout=10, trust_env=False).text
    counts: dict[str, float] = {}
    for match in REQUESTS_TOTAL.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("endpoint") == "classify" and labels.get("model") == model:
            counts[labels["status"]] = counts.get(labels["status"], 0) + float(match["value"])
    return counts


ACCESS_LOG = re.compile(r"request_id=(?P<id>\S+) .*?status=(?P<status>\d+) .*?ms=(?P<ms>[0-9.]+)")


def server_side_latency(log_text: str, id_prefix: str) -> dict[str, Any]:
    """Latency per status as the server measured it (its access log: from the request's
    arrival in the app to its answer), for the requests whose ids start with ``id_prefix``.

    Set beside the client's numbers, it splits a slow answer into time spent in the server
    and time spent before it (the kernel's accept queue, the event loop's backlog, and the
    load generator itself, which shares the same CPUs)."""
    by_status: dict[str, list[float]] = {}
    for match in ACCESS_LOG.finditer(log_text):
        if match["id"].startswith(id_prefix):
            by_status.setdefault(match["status"], []).append(float(match["ms"]) / 1e3)
    return {status: benchlib.latency_summary_ms(seconds) for status, seconds in sorted(by_status.items())}


def goodput_until_drained(result: loadgen.LoadResult) -> float | None:
    ends = [r.start + r.latency for r in result.records if r.status == 200]
    return round(len(ends) / max(ends), 3) if ends else None


def tally(result: loadgen.LoadResult) -> dict[str, Any]:
    """Every request sent got exactly one answer: ids echoed once each, statuses add up."""
    records = result.records
    sent_ids = Counter(r.request_id for r in records)
    echoed = Counter(r.echoed_id for r in records if r.echoed_id is not None)
    statuses = Counter(r.status for r in records)
    transport = Counter(r.error for r in records if r.status == 0)
    mismatched = sum(1 for r in records if r.status and r.echoed_id != r.request_id)
    answered = sum(v for k, v in statuses.items() if k)
    ok, shed = statuses.get(200, 0), statuses.get(429, 0)
    return {
        "sent": len(records),
        "answered": answered,
        "status_200": ok,
        "status_429": shed,
        "other_statuses": {str(k): v for k, v in statuses.items() if k not in (0, 200, 429)},
        "transport_errors": dict(transport),
        "ids_sent_more_than_once": sum(1 for v in sent_ids.values() if v > 1),
        "ids_answered_more_than_once": sum(1 for v in echoed.values() if v > 1),
        "answers_with_wrong_id": mismatched,
        "client_dropped_not_sent": result.client_dropped,
        "sent_equals_200_429_other": len(records) == answered,
        "exactly_one_answer_each": (
            len(records) == answered
            and not transport
            and mismatched == 0
            and all(v == 1 for v in echoed.values())
            and len(echoed) == len(records)
        ),
    }


def rss_mib(server: loadgen.ManagedServer) -> float | None:
    kib = server.rss_kib()
    return round(kib / 1024, 1) if kib is not None else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factor", type=float, default=10.0, help="overload = factor × sustainable rate")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of overload")
    parser.add_argument("--calibrate-s", type=float, default=15.0, help="seconds measuring the sustainable rate")
    parser.add_argument("--calibrate-concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=None, help="skip calibration: use this sustainable rate")
    parser.add_argument("--max-inflight", type=int, default=1024, help="client bound on requests in flight")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (seconds)")
    parser.add_argument("--settle-s", type=float, default=20.0, help="seconds watching RSS after the overload")
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="'back to baseline': within this fraction")
    parser.add_argument("--rss-slack-mib", type=float, default=64.0, help="... plus this many MiB")
    parser.add_argument("--probe-s", type=float, default=5.0, help="seconds of concurrency-1 traffic afterwards")
    parser.add_argument("--model", default=loadgen.DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--server-args", default="", help="more `python -m app serve` flags, one string")
    parser.add_argument(
        "--server-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the server process, e.g. MALLOC_ARENA_MAX=2",
    )
    parser.add_argument("--photos", type=int, default=None, help="use only the first N photos")
    parser.add_argument("--models-dir", type=Path, default=None, help="model repository (default: models/)")
    benchlib.add_report_args(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = benchlib.utc_now()
    load_start = benchlib.load_average()
    photos = loadgen.load_photos()[: args.photos]
    templates = loadgen.photo_templates(photos, args.model)
    extra = shlex.split(args.server_args)
    # info: the access log (one line per request, with its server-side duration) is read back.
    server = loadgen.equiserve_server(
        None, "--log-level", "info", *extra, model=args.model, models_dir=args.models_dir, threads=args.threads
    )
    server_env = dict(item.split("=", 1) for item in args.server_env)
    server.env.update(server_env)
    rss_trace: list[tuple[float, float | None]] = []
    with server:
        time.sleep(2.0)
        rss_baseline = rss_mib(server)
        print(f"baseline RSS {rss_baseline} MiB", file=sys.stderr, flush=True)

        if args.rate is None:
            print(
                f"calibrating: concurrency {args.calibrate_concurrency} for {args.calibrate_s:.0f} s", file=sys.stderr
            )
            calibration = asyncio.run(
                loadgen.run_closed_loop(
                    server.base_url,
                    templates,
                    concurrency=args.calibrate_concurrency,
                    duration_s=args.calibrate_s,
                    warmup_s=min(3.0, args.calibrate_s / 3),
                    timeout_s=args.timeout,
                    id_prefix="calibrate",
                )
            )
            calibration_summary: dict[str, Any] | None = calibration.summary()
            sustainable = max(calibration_summary["throughput_rps"], 0.5)
        else:
            calibration_summary, sustainable = None, args.rate
        rate = args.factor * sustainable
        counts_before = server_request_counts(server.base_url, args.model)
        rss_before_overload = rss_mib(server)
        print(
            f"sustainable {sustainable:.2f} req/s -> overload at {rate:.1f} req/s for {args.duration:.0f} s",
            file=sys.stderr,
            flush=True,
        )

        t_overload = time.monotonic()

        def sample(_elapsed: float) -> None:
            rss_trace.append((round(time.monotonic() - t_overload, 1), rss_mib(server)))

        overload = asyncio.run(
            loadgen.run_open_loop(
                server.base_url,
                templates,
                rate=rate,
                duration_s=args.duration,
                max_inflight=args.max_inflight,
                timeout_s=args.timeout,
                id_prefix="overload",
                max_requests=int(rate * args.duration) + 10,
                on_tick=sample,
            )
        )
        print(f"overload done after {overload.wall_s:.1f} s; settling {args.settle_s:.0f} s", file=sys.stderr)
        settle_end = time.monotonic() + args.settle_s
        while time.monotonic() < settle_end:
            sample(0)
            time.sleep(1.0)
        counts_after = server_request_counts(server.base_url, args.model)
        rss_after = rss_mib(server)
        probe = asyncio.run(
            loadgen.run_closed_loop(
                server.base_url,
                templates,
                concurrency=1,
                duration_s=args.probe_s,
                timeout_s=args.timeout,
                id_prefix="probe",
            )
        )
        rss_end = rss_mib(server)

    server_counted = {k: counts_after.get(k, 0) - counts_before.get(k, 0) for k in counts_after}
    server_counted = {k: int(v) for k, v in server_counted.items() if v}
    counts = tally(overload)
    counts["server_counted"] = server_counted
    counts["server_total_equals_sent"] = sum(server_counted.values()) == counts["sent"]
    ok = [r.latency for r in overload.records if r.status == 200]
    shed = [r.latency for r in overload.records if r.status == 429]
    peak = max((v for _, v in rss_trace if v is not None), default=None)
    limit = rss_baseline * (1 + args.rss_tolerance) + args.rss_slack_mib if rss_baseline else None
    summary = overload.summary()
    report = benchlib.report_header("bench_overload", started, args.note, load_start)
    report["config"] = {
        "model": args.model,
        "server_args": extra,
        "server_env": server_env,
        "factor": args.factor,
        "calibrate_concurrency": args.calibrate_concurrency,
        "calibrate_s": args.calibrate_s,
        "duration_s": args.duration,
        "max_inflight": args.max_inflight,
        "timeout_s": args.timeout,
        "photos": [p.name for p in photos],
        "request": "multipart/form-data, one JPEG per request, method=equitune, top_k=3",
    }
    report["calibration"] = calibration_summary
    report["sustainable_rps"] = sustainable
    report["offered_rps"] = rate
    report["overload"] = {
        **summary,
        "accepted_latency": benchlib.latency_summary_ms(ok),
        "shed_latency": benchlib.latency_summary_ms(shed),
        "goodput_over_sustainable": round(summary["throughput_rps"] / sustainable, 3) if sustainable else None,
        # 200s per second from the first arrival to the last accepted answer: accepted requests
        # finish up to a deadline after the 30 s window, which the windowed throughput leaves out.
        "goodput_until_drained_rps": goodput_until_drained(overload),
        "wall_s": round(overload.wall_s, 1),
        "server_side_latency_by_status": server_side_latency(server.log_path.read_text(errors="replace"), "overload-"),
    }
    report["tally"] = counts
    report["rss_mib"] = {
        "baseline": rss_baseline,
        "before_overload": rss_before_overload,
        "peak": peak,
        "after_settle": rss_after,
        "after_probe": rss_end,
        "limit": round(limit, 1) if limit else None,
        "back_to_baseline": rss_after is not None and limit is not None and rss_after <= limit,
        "trace": rss_trace,
    }
    report["probe_after"] = probe.summary()
    report["verdict"] = {
        "sheds_with_429": counts["status_429"] > 0,
        "exactly_one_answer_each": counts["exactly_one_answer_each"] and counts["server_total_equals_sent"],
        "accepted_p99_ms": report["overload"]["accepted_latency"]["p99_ms"],
        "rss_back_to_baseline": report["rss_mib"]["back_to_baseline"],
        "probe_p50_ms": report["probe_after"]["latency"]["p50_ms"],
    }
    report["records"] = overload.to_json(include_records=True)["records"]
    report["records_columns"] = ["request_id", "kind", "start_s", "latency_ms", "status", "batch_size"]
    benchlib.write_json(args.out, report)
    print_report(report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    o, t, r = report["overload"], report["tally"], report["rss_mib"]
    m = report["machine"]
    print(
        f"{m['cpu_model']}, {m['usable_cpus']} cpus | load average {m['load_average_start']} -> "
        f"{m['load_average_end']} | {report['timestamp']} | server args {report['config']['server_args']}"
    )
    rows = [
        ["sustainable rate (closed loop)", f"{report['sustainable_rps']:.2f} req/s"],
        ["offered (open loop)", f"{report['offered_rps']:.1f} req/s for {report['config']['duration_s']:.0f} s"],
        ["sent / answered", f"{t['sent']} / {t['answered']}"],
        ["200 / 429 / other", f"{t['status_200']} / {t['status_429']} / {t['other_statuses'] or 0}"],
        ["transport errors, timeouts", str(t["transport_errors"] or 0)],
        ["exactly one answer per X-Request-ID", str(t["exactly_one_answer_each"])],
        ["server counted (/metrics)", str(t["server_counted"])],
        ["goodput (200/s) / sustainable", f"{o['throughput_rps']:.2f} req/s ({o['goodput_over_sustainable']})"],
        ["goodput until the last 200 (200/s)", str(o["goodput_until_drained_rps"])],
        [
            "accepted p50 / p99 / max ms",
            f"{o['accepted_latency']['p50_ms']} / {o['accepted_latency']['p99_ms']} / "
            f"{o['accepted_latency']['max_ms']}",
        ],
        ["shed (429) p50 / p99 ms", f"{o['shed_latency']['p50_ms']} / {o['shed_latency']['p99_ms']}"],
        *[
            [f"  server-side {status} p50 / p99 ms", f"{v['p50_ms']} / {v['p99_ms']} (n={v['n']})"]
            for status, v in o["server_side_latency_by_status"].items()
        ],
        ["load generator CPU (fraction of one core)", str(o.get("client_cpu_fraction"))],
        [
            "RSS baseline / peak / after MiB",
            f"{r['baseline']} / {r['peak']} / {r['after_settle']} (limit {r['limit']})",
        ],
        ["RSS back to baseline", str(r["back_to_baseline"])],
        ["probe afterwards (c=1) p50 ms", str(report["probe_after"]["latency"]["p50_ms"])],
    ]
    benchlib.print_table("Overload: open loop at factor × the sustainable rate", ["", "value"], rows)


if __name__ == "__main__":
    raise SystemExit(main())

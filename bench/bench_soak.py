"""Benchmark: a long run of mixed traffic, watching memory growth and latency drift.

Issue #7, item 5. Leaks and slow drifts only show over minutes: a cache that never evicts,
a metric label per request id, a buffer kept per failed request. This script starts
``python -m app serve`` and sends ``--minutes`` (10) of mixed traffic from
``--concurrency`` closed-loop workers, picked at random with fixed weights and seed:

* good requests: multipart with one photo (all four methods, several ``top_k``), two
  photos in one request, JSON with base64, a PNG, a small (96 px) and a large (2400 px)
  photo;
* bad requests, each with the status it must get: a truncated JPEG (400), a text file
  (415), an unknown model (404), an unknown method and ``top_k=0`` (422), a form without
  an image (422), invalid JSON (422), a body of an unsupported type (415);
* reads: ``GET /v1/models``, ``/health/ready``, ``/metrics``.

Every template is sent once first (preflight) to check its expected status. During the
run the server's ``VmRSS`` is sampled every second. The report gives, per minute, the
p50/p99 latency of the successful classify requests, their count, the unexpected
statuses and the RSS; then the RSS growth (last minute vs first) and the latency drift
(last minute's p50/p99 over the first minute's).

Run from the repository root::

    python bench/bench_soak.py [--minutes 10] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchlib
import loadgen
import numpy as np
from benchlib import RESULTS_DIR
from loadgen import RequestTemplate

from app.equivariance import METHOD_NAMES

DEFAULT_OUT = RESULTS_DIR / "soak_cpu.json"


def soak_templates(photos: Sequence[loadgen.Photo], model: str) -> list[RequestTemplate]:
    """The traffic mix: about 80 % good classify requests, 12 % bad ones, 8 % reads."""
    good: list[RequestTemplate] = []
    for i, photo in enumerate(photos):
        method = METHOD_NAMES[i % len(METHOD_NAMES)]
        good.append(loadgen.multipart_classify([photo], model, method=method, top_k=1 + i % 3, weight=4.0))
    good.append(loadgen.multipart_classify(photos[:2], model, method="lambda", kind="multipart:2 images", weight=3.0))
    good.append(loadgen.json_classify([photos[0]], model, method="equizero", kind="json:b64", weight=4.0))
    good.append(loadgen.json_classify([photos[1]], model, method=None, top_k=None, kind="json:defaults", weight=2.0))
    small = loadgen.resized_photo(photos[0], 96, fmt="PNG")
    large = loadgen.resized_photo(photos[-1], 2400)
    good.append(loadgen.multipart_classify([small], model, kind="multipart:png 96px", weight=3.0))
    good.append(loadgen.multipart_classify([large], model, kind="multipart:jpeg 2400px", weight=2.0))

    truncated = loadgen.Photo("truncated", photos[0].data[: len(photos[0].data) // 3], "image/jpeg", 0, 0)
    text_file = loadgen.Photo("notes", b"this is not an image\n" * 20, "text/plain", 0, 0)
    bad = [
        _expect(loadgen.multipart_classify([truncated], model, kind="bad:truncated jpeg"), 400),
        _expect(loadgen.multipart_classify([text_file], model, kind="bad:text/plain file"), 415),
        _expect(loadgen.multipart_classify([photos[0]], "no-such-model", kind="bad:unknown model"), 404),
        _expect(loadgen.multipart_classify([photos[0]], model, method="magic", kind="bad:unknown method"), 422),
        _expect(loadgen.multipart_classify([photos[0]], model, top_k=0, kind="bad:top_k=0"), 422),
    ]
    body, content_type = loadgen.encode_multipart([], [("method", "lambda")])
    path = loadgen.classify_path(model)
    bad += [
        RequestTemplate("bad:form without image", "POST", path, body, content_type, (422,)),
        RequestTemplate("bad:invalid json", "POST", path, b'{"images": [', "application/json", (422,)),
        RequestTemplate("bad:text/plain body", "POST", path, b"hello", "text/plain", (415,)),
    ]
    reads = [
        RequestTemplate("get:/v1/models", "GET", "/v1/models", weight=2.0),
        RequestTemplate("get:/health/ready", "GET", "/health/ready", weight=2.0),
        RequestTemplate("get:/metrics", "GET", "/metrics", weight=1.0),
    ]
    return good + bad + reads


def _expect(template: RequestTemplate, status: int) -> RequestTemplate:
    return RequestTemplate(
        template.kind, template.method, template.path, template.body, template.content_type, (status,), 1.0
    )


def per_minute(records: Sequence[loadgen.Record], rss: Sequence[tuple[float, float]], minutes: int) -> list[dict]:
    rows = []
    for minute in range(minutes):
        lo, hi = minute * 60.0, (minute + 1) * 60.0
        in_minute = [r for r in records if lo <= r.start < hi]
        ok = [r.latency for r in in_minute if r.status == 200 and r.kind.startswith(("multipart", "json"))]
        rss_values = [v for t, v in rss if lo <= t < hi]
        rows.append(
            {
                "minute": minute + 1,
                "requests": len(in_minute),
                "classify_ok": len(ok),
                "latency": benchlib.latency_summary_ms(ok),
                "unexpected": sum(1 for r in in_minute if not r.expected),
                "transport_errors": sum(1 for r in in_minute if r.status == 0),
                "rss_mib_median": round(float(np.median(rss_values)), 1) if rss_values else None,
                "rss_mib_max": round(max(rss_values), 1) if rss_values else None,
            }
        )
    return rows


def drift(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Last minute vs first minute (both with data): RSS growth, p50/p99 ratios."""
    with_data = [r for r in rows if r["classify_ok"] and r["rss_mib_median"] is not None]
    if len(with_data) < 2:
        return {}
    first, last = with_data[0], with_data[-1]
    p50 = [r["latency"]["p50_ms"] for r in with_data]
    slope = float(np.polyfit(range(len(p50)), p50, 1)[0]) if len(p50) >= 3 else None
    return {
        "first_minute": first["minute"],
        "last_minute": last["minute"],
        "rss_growth_mib": round(last["rss_mib_median"] - first["rss_mib_median"], 1),
        "rss_growth_pct": round(100 * (last["rss_mib_median"] / first["rss_mib_median"] - 1), 2),
        "p50_last_over_first": round(last["latency"]["p50_ms"] / first["latency"]["p50_ms"], 3),
        "p99_last_over_first": round(last["latency"]["p99_ms"] / first["latency"]["p99_ms"], 3),
        "p50_slope_ms_per_minute": round(slope, 2) if slope is not None else None,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop workers")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=loadgen.DEFAULT_MODEL)
    parser.add_argument("--models-dir", type=Path, default=None, help="model repository (default: models/)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--server-args", default="", help="more `python -m app serve` flags, one string")
    benchlib.add_report_args(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = benchlib.utc_now()
    load_start = benchlib.load_average()
    photos = loadgen.load_photos()
    templates = soak_templates(photos, args.model)
    extra = shlex.split(args.server_args)
    server = loadgen.equiserve_server(None, *extra, model=args.model, models_dir=args.models_dir, threads=args.threads)
    duration = args.minutes * 60
    rss: list[tuple[float, float]] = []
    load_trace: list[tuple[float, list[float] | None]] = []
    with server:
        rss_ready = server.rss_kib()
        preflight = asyncio.run(
            loadgen.run_closed_loop(
                server.base_url,
                templates,
                concurrency=1,
                duration_s=600,
                max_requests=len(templates),
                timeout_s=args.timeout,
                id_prefix="preflight",
            )
        )
        preflight_rows = {r.kind: {"status": r.status, "expected": r.expected} for r in preflight.records}
        wrong = {k: v for k, v in preflight_rows.items() if not v["expected"]}
        if wrong:
            print(f"preflight: unexpected statuses {wrong}", file=sys.stderr)
        print(
            f"soak: {len(templates)} request kinds, {args.concurrency} workers, {args.minutes} min",
            file=sys.stderr,
            flush=True,
        )

        def sample(elapsed: float) -> None:
            kib = server.rss_kib()
            if kib is not None:
                rss.append((round(elapsed, 1), round(kib / 1024, 1)))
            if int(elapsed) % 60 == 0:
                load_trace.append((round(elapsed), benchlib.load_average()))
                print(f"  {elapsed / 60:.1f} min, RSS {rss[-1][1] if rss else '?'} MiB", file=sys.stderr, flush=True)

        t0 = time.monotonic()
        result = asyncio.run(
            loadgen.run_closed_loop(
                server.base_url,
                templates,
                concurrency=args.concurrency,
                duration_s=duration,
                max_requests=10_000_000,
                timeout_s=args.timeout,
                weighted=True,
                seed=args.seed,
                id_prefix="soak",
                on_tick=sample,
            )
        )
        wall = time.monotonic() - t0
        rss_end = server.rss_kib()

    minutes = max(1, int(np.ceil(duration / 60)))
    rows = per_minute(result.records, rss, minutes)
    kinds = Counter(r.kind for r in result.records)
    unexpected = Counter(f"{r.kind} -> {r.status or r.error}" for r in result.records if not r.expected)
    report = benchlib.report_header("bench_soak", started, args.note, load_start)
    report["config"] = {
        "model": args.model,
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "server_args": extra,
        "templates": [
            {"kind": t.kind, "expect": list(t.expect), "weight": t.weight, "bytes": len(t.body)} for t in templates
        ],
    }
    report["preflight"] = preflight_rows
    report["summary"] = {
        "requests": len(result.records),
        "wall_s": round(wall, 1),
        "by_kind": dict(kinds.most_common()),
        "statuses": dict(Counter(str(r.status) for r in result.records).most_common()),
        "unexpected": dict(unexpected),
        "transport_errors": sum(1 for r in result.records if r.status == 0),
        "rss_mib_ready": round(rss_ready / 1024, 1) if rss_ready else None,
        "rss_mib_end": round(rss_end / 1024, 1) if rss_end else None,
        "client_cpu_fraction": round(result.client_cpu_s / max(result.wall_s, 1e-9), 3),
    }
    report["per_minute"] = rows
    report["drift"] = drift(rows)
    report["rss_trace_mib"] = rss
    report["load_average_trace"] = load_trace
    benchlib.write_json(args.out, report)
    print_report(report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"{m['cpu_model']}, {m['usable_cpus']} cpus | load average {m['load_average_start']} -> "
        f"{m['load_average_end']} | {report['timestamp']}"
    )
    rows = [
        [
            str(r["minute"]),
            str(r["requests"]),
            str(r["classify_ok"]),
            benchlib.fmt(r["latency"]["p50_ms"]),
            benchlib.fmt(r["latency"]["p99_ms"]),
            str(r["unexpected"]),
            str(r["transport_errors"]),
            benchlib.fmt(r["rss_mib_median"]),
            benchlib.fmt(r["rss_mib_max"]),
        ]
        for r in report["per_minute"]
    ]
    benchlib.print_table(
        "Soak: per minute (latency of successful classify requests)",
        ["minute", "requests", "classify 200", "p50 ms", "p99 ms", "unexpected", "transport err", "RSS MiB", "max"],
        rows,
    )
    s, d = report["summary"], report["drift"]
    benchlib.print_table(
        "Soak: totals and drift",
        ["", "value"],
        [
            ["requests / wall", f"{s['requests']} in {s['wall_s']} s"],
            ["statuses", str(s["statuses"])],
            ["unexpected statuses", str(s["unexpected"] or 0)],
            ["transport errors", str(s["transport_errors"])],
            ["RSS ready -> end MiB", f"{s['rss_mib_ready']} -> {s['rss_mib_end']}"],
            ["RSS growth first -> last minute", f"{d.get('rss_growth_mib')} MiB ({d.get('rss_growth_pct')} %)"],
            ["p50 / p99 last over first minute", f"{d.get('p50_last_over_first')} / {d.get('p99_last_over_first')}"],
            ["p50 slope ms/minute", str(d.get("p50_slope_ms_per_minute"))],
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main())

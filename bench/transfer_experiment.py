"""The paper's transfer experiment, reduced to a CPU: ImageNet EfficientNet-Lite0 -> Fashion-MNIST.

EfficientNet-Lite0 with its real ImageNet weights stays frozen; only linear heads and λ-nets
are trained, on cached features of every group copy. For each group (c4, then d4):

* zero-shot: a linear head trained on UPRIGHT training images only (vanilla objective, early
  stopping on upright validation images); then a λ-net trained with head and backbone frozen
  (λ-equitune objective). Every method is evaluated with that one head.
* fine-tuned: starting from the zero-shot head (and λ-net), each method is fine-tuned with its
  own objective on training images under random group elements (the paper's protocol):
  vanilla (plain augmentation), equitune, equizero (straight-through; both losses) and
  λ-equitune (head and λ-net jointly). Early stopping on rotated validation images.

Test sets: upright, each image under a random group element, and under every element. The
test set is touched only by the final evaluation: model selection uses the validation split.
One d4 feature cache serves both groups (c4 is d4's first four elements). The head and λ-net
of the best c4 configuration (by validation accuracy) are shipped as models/fashion-effnet-c4
and checked through the serving path on rotated uploads.

Run from the repository root::

    python bench/transfer_experiment.py            # ~15-25 min on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `python bench/transfer_experiment.py` finds `app` without installing it
    sys.path.insert(0, str(REPO_ROOT))

from app.backbones.datasets import ImageSet, load_splits  # noqa: E402
from app.backbones.efficientnet import EfficientNetLite  # noqa: E402
from app.backbones.preprocess import pixels_from_uint8  # noqa: E402
from app.equivariance import LambdaNet, Method, ZeroLoss, image_group  # noqa: E402
from app.tasks.classify.training.evaluate import COLUMN_TITLES, evaluate_features, predict  # noqa: E402
from app.tasks.classify.training.export import verify_reload, write_model  # noqa: E402
from app.tasks.classify.training.features import CopyFeatures, FeatureCache, transformed, use_fast_cpu_layout  # noqa: E402
from app.tasks.classify.training.trainer import TrainConfig, TrainResult, train_on_features  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
SHIP_NAME = "fashion-effnet-c4"

# (model name, objective, equizero loss, where the λ-net starts: None = no λ-net; "zero_shot" =
# continue from the zero-shot head and λ-net; "fresh" = zero-shot head, new λ-net; "equitune" =
# the fine-tuned equitune head with a new λ-net whose last layer is zero, i.e. starting exactly
# at fine-tuned equitune (uniform λ): λ-equitune contains equitune, and this start makes it so).
FINE_TUNED: tuple[tuple[str, Method, ZeroLoss, str | None], ...] = (
    ("vanilla", Method.VANILLA, ZeroLoss.NEG_MAX_PROB, None),
    ("equitune", Method.EQUITUNE, ZeroLoss.NEG_MAX_PROB, None),
    ("equizero_neg_max_prob", Method.EQUIZERO, ZeroLoss.NEG_MAX_PROB, None),
    ("equizero_entropy", Method.EQUIZERO, ZeroLoss.ENTROPY, None),
    ("lambda", Method.LAMBDA, ZeroLoss.NEG_MAX_PROB, "zero_shot"),
    ("lambda_fresh", Method.LAMBDA, ZeroLoss.NEG_MAX_PROB, "fresh"),
    ("lambda_from_equitune", Method.LAMBDA, ZeroLoss.NEG_MAX_PROB, "equitune"),
)
# The fine-tuned λ-equitune of the main table: whichever λ start has the higher validation accuracy.
LAMBDA_VARIANTS = ("lambda", "lambda_fresh", "lambda_from_equitune")


def machine_info() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu_model": cpu,
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }


def train(
    train_set: CopyFeatures, val_set: CopyFeatures, head: nn.Linear, lam: LambdaNet, label: str, **config: Any
) -> dict[str, Any]:
    cfg = TrainConfig(**{"epochs": 100, "patience": 10, "batch_size": 256, "lr": 1e-3, "progress": False, **config})
    result: TrainResult = train_on_features(train_set, val_set, head, lam, cfg)
    print(
        f"  {label:<34} val {result.initial_val_accuracy:.4f} -> {result.best_val_accuracy:.4f} "
        f"(epoch {result.best_epoch}/{result.epochs_run}, {result.seconds:.1f} s)",
        flush=True,
    )
    return {"config": cfg.to_dict(), **result.to_dict()}


def run_group(
    group_name: str, train_d4: CopyFeatures, val_d4: CopyFeatures, test_d4: CopyFeatures, seed: int
) -> dict[str, Any]:
    group = image_group(group_name)
    tr, va, te = train_d4.restrict(group), val_d4.restrict(group), test_d4.restrict(group)
    out: dict[str, Any] = {"group": group_name, "elements": group.names}
    print(f"[{group_name}] zero-shot", flush=True)
    torch.manual_seed(seed)
    head0 = nn.Linear(tr.features.shape[-1], 10)
    lam0 = LambdaNet(tr.features.shape[-1])
    head_log = train(tr, va, head0, lam0, "head on upright images (vanilla)", objective="vanilla", train_lambda=False)
    lam_log = train(
        tr, va, head0, lam0, "λ-net, head frozen", objective="lambda", train_head=False, val_transform="random"
    )
    out["zero_shot"] = {
        "head_training": head_log,
        "lambda_training": lam_log,
        "test": evaluate_features(te, head0, lam0, seed=seed).to_dict(),
        "val_random": _val_random(va, head0, lam0, seed),
    }
    out["_modules"] = {"zero_shot": (head0, lam0)}

    print(f"[{group_name}] fine-tuned (each method with its own objective, random group elements)", flush=True)
    fine: dict[str, Any] = {}
    for name, objective, zero_loss, lambda_start in FINE_TUNED:
        trains_lambda = lambda_start is not None
        head, lam = copy.deepcopy(head0), copy.deepcopy(lam0)
        if lambda_start in ("fresh", "equitune"):
            torch.manual_seed(seed + 1)
            lam = LambdaNet(tr.features.shape[-1])
        if lambda_start == "equitune":
            head = copy.deepcopy(out["_modules"]["fine_tuned:equitune"][0])
            last = lam.mlp[-1]
            assert isinstance(last, nn.Linear)
            with torch.no_grad():  # log λ = 0 for every copy: uniform, and still learnable
                last.weight.zero_()
                last.bias.zero_()
        log = train(
            tr,
            va,
            head,
            lam,
            f"{name}",
            objective=objective,
            zero_loss=zero_loss,
            train_lambda=trains_lambda,
            augment=True,
        )
        fine[name] = {
            "training": log,
            "test": evaluate_features(te, head, lam if trains_lambda else None, seed=seed).to_dict(),
            "val_random": _val_random(va, head, lam if trains_lambda else None, seed),
        }
        out["_modules"][f"fine_tuned:{name}"] = (head, lam)
    fine["lambda_selected"] = max(LAMBDA_VARIANTS, key=lambda k: fine[k]["val_random"]["lambda"])
    out["fine_tuned"] = fine
    return out


def _val_random(val: CopyFeatures, head: nn.Module, lam: LambdaNet | None, seed: int) -> dict[str, float]:
    """Validation accuracy of every method under random group elements (for model selection)."""
    report = evaluate_features(val, head, lam, seed=seed + 1)
    return {name: acc["random"] for name, acc in report.accuracy.items()}


# -- shipping the best c4 configuration ------------------------------------------------------------------


def ship(
    c4: dict[str, Any], backbone: EfficientNetLite, val: CopyFeatures, test: ImageSet, test_copies: CopyFeatures, args
) -> dict[str, Any]:
    """Write the best c4 head + λ-net (by λ-equitune validation accuracy on rotated images), then
    check the served model on rotated uint8 uploads against the cached evaluation."""
    val_scores = {"zero_shot": c4["zero_shot"]["val_random"]}
    val_scores.update({f"fine_tuned:{k}": c4["fine_tuned"][k]["val_random"] for k in LAMBDA_VARIANTS})
    candidates = {name: scores["lambda"] for name, scores in val_scores.items()}
    chosen = max(candidates, key=lambda k: candidates[k])
    head, lam = c4["_modules"][chosen]
    zero_loss = max((ZeroLoss.NEG_MAX_PROB, ZeroLoss.ENTROPY), key=lambda z: val_scores[chosen][f"equizero_{z.value}"])
    group = image_group("c4")
    with torch.no_grad():  # a λ-net whose best validated state is uniform makes `lambda` answer as `equitune`
        val_weights = torch.softmax(lam(val.features), dim=0)
    lambda_uniform = bool((val_weights - 1.0 / group.order).abs().max() < 1e-6)
    backbone = copy.deepcopy(backbone)
    backbone.replace_head(test.classes, {"weight": head.weight.detach(), "bias": head.bias.detach()})
    options = {"variant": 0, "pretrained": True, "input_size": args.input_size}
    header = (
        f"Reproduce: python bench/transfer_experiment.py (see bench/results/transfer_fashion_mnist.md)\n"
        f"Frozen ImageNet EfficientNet-Lite0 at {args.input_size} px; configuration `{chosen}` chosen by "
        f"validation accuracy of λ-equitune on rotated images ({candidates[chosen]:.4f});\n"
        f"trained on {args.train_size} Fashion-MNIST training images ({args.val_size} held out for validation)."
        + (
            "\nIts best validated λ is uniform (the start): `lambda` answers exactly as `equitune`."
            if lambda_uniform
            else ""
        )
    )
    written = write_model(
        args.models_dir,
        SHIP_NAME,
        family="efficientnet_lite",
        options=options,
        backbone=backbone,
        group=group,
        labels=test.classes,
        lambda_net=lam,
        default_method=Method.LAMBDA,
        zero_loss=zero_loss,
        description="Fashion-MNIST from ImageNet EfficientNet-Lite0 (frozen) + λ-equitune, invariant to c4 rotations",
        header=header,
    )
    assert not written.trunk_saved, "the frozen pretrained trunk must come from the package, not a file"
    verify_reload(args.models_dir, SHIP_NAME, backbone, lam, val.features[0, :64])

    # The serving path: load_model, a rotated uint8 upload -> pixels_from_uint8 -> the fused pass.
    from app.tasks import load_model

    loaded = load_model(args.models_dir, SHIP_NAME, device="cpu")
    n = min(args.serve_check, len(test))
    ks = torch.randint(4, (n,), generator=torch.Generator().manual_seed(args.seed + 2))
    size = args.input_size
    pixels = torch.stack(
        [
            pixels_from_uint8(np.ascontiguousarray(np.rot90(test.rgb(i), int(ks[i]), axes=(0, 1))), size)
            for i in range(n)
        ]
    )
    agree: dict[str, float] = {}
    with torch.inference_mode():
        aligned = head(test_copies.restrict(group).features[:, :n])
        log_lambda = lam(test_copies.restrict(group).features[:, :n])
        copies = loaded.model.copies(pixels)
        for method in Method:
            served = loaded.model.combine(copies, method).output.argmax(-1)
            cached = predict(transformed(aligned, group, ks), transformed(log_lambda, group, ks), method, zero_loss)
            agree[method.value] = float((served == cached).float().mean())
    print(f"served model on {n} rotated uploads agrees with the cached evaluation: {agree}", flush=True)
    return {"chosen": chosen, "candidates_val_lambda_random": candidates, "zero_loss": zero_loss.value,
            "lambda_uniform": lambda_uniform, "served_vs_cached_agreement": agree,
            "serve_check_images": n}  # fmt: skip


# -- tables ------------------------------------------------------------------------------------------------

METHOD_ORDER = ("vanilla", "equitune", "equizero_neg_max_prob", "equizero_entropy", "lambda")
TEST_SETS = (("upright", "upright"), ("random", "random g"), ("every", "every g"))


def markdown(results: dict[str, Any]) -> str:
    cfg, timing = results["config"], results["timing"]
    m = results["machine"]
    lines = [
        "# Transfer: ImageNet EfficientNet-Lite0 (frozen) -> Fashion-MNIST, c4 and d4",
        "",
        f"Top-1 accuracy (%) on {cfg['test_size']} Fashion-MNIST test images; heads and λ-nets trained on "
        f"{cfg['train_size']} training images, early-stopped on {cfg['val_size']} held-out training images; "
        f"input {cfg['input_size']} px (28x28 grayscale replicated to RGB, the server's `pixels_from_uint8`). "
        "Test sets: upright; each image under a random group element (seeded); mean over every element.",
        "",
        "*Zero-shot*: one linear head trained on upright images only; λ-net trained with head and backbone "
        "frozen; every method uses that head. *Fine-tuned*: from there, each method fine-tunes the head "
        "(λ-equitune: head and λ-net) with its own objective on images under random group elements "
        "(equizero: straight-through estimator).",
        "",
        "| group | setting | test set | " + " | ".join(COLUMN_TITLES[k] for k in METHOD_ORDER) + " |",
        "|---|---|---|" + "---:|" * len(METHOD_ORDER),
    ]
    for group in ("c4", "d4"):
        r = results["groups"][group]
        for setting in ("zero_shot", "fine_tuned"):
            for key, title in TEST_SETS:
                cells = []
                for method in METHOD_ORDER:
                    if setting == "zero_shot":
                        acc = r["zero_shot"]["test"]["accuracy"][method][key]
                    else:
                        model = r["fine_tuned"]["lambda_selected"] if method == "lambda" else method
                        acc = r["fine_tuned"][model]["test"]["accuracy"][method][key]
                    cells.append(f"{100 * acc:.1f}")
                best = max(float(c) for c in cells)
                cells = [f"**{c}**" if float(c) == best else c for c in cells]
                setting_title = "zero-shot" if setting == "zero_shot" else "fine-tuned"
                lines.append(f"| {group} | {setting_title} | {title} | " + " | ".join(cells) + " |")
    lines += ["", "λ statistics (upright test images; normalised λ per transform):", ""]
    lines += ["| group | setting | mean λ per transform | largest λ on the upright copy |", "|---|---|---|---:|"]
    for group in ("c4", "d4"):
        r = results["groups"][group]
        for setting, report in (
            ("zero-shot", r["zero_shot"]["test"]),
            ("fine-tuned", r["fine_tuned"][r["fine_tuned"]["lambda_selected"]]["test"]),
        ):
            weights = ", ".join(f"{k} {v:.2f}" for k, v in report["lambda_mean_weight"].items())
            lines.append(f"| {group} | {setting} | {weights} | {100 * report['lambda_share_upright_max']:.1f}% |")
    lines += [
        "",
        "Under d4 the λ-net splits its weight between `identity` and `hflip`: most Fashion-MNIST items are "
        "left-right symmetric, so both copies look upright. A uniform λ (the same weight on every copy) counts as "
        "0% here: then λ-equitune is equitune.",
    ]
    lines += ["", "Fine-tuned λ-equitune from each start (validation accuracy under random group elements, %):", ""]
    lines += ["| group | " + " | ".join(f"`{v}`" for v in LAMBDA_VARIANTS) + " | equitune |", "|---|" + "---:|" * 4]
    for group in ("c4", "d4"):
        fine = results["groups"][group]["fine_tuned"]
        cells = [f"{100 * fine[v]['val_random']['lambda']:.2f}" for v in LAMBDA_VARIANTS]
        lines.append(
            f"| {group} | " + " | ".join(cells) + f" | {100 * fine['equitune']['val_random']['equitune']:.2f} |"
        )
    ship_info = results.get("ship")
    lines += [
        "",
        f"Setup: {cfg['train_size']} train / {cfg['val_size']} val / {cfg['test_size']} test images, seed "
        f"{cfg['seed']}; {cfg['input_size']} px; backbone frozen, features of all 8 d4 copies cached once "
        f"({timing['features_computed_s'] / 60:.1f} min to compute, as safetensors), c4 reads the first four. "
        "Training: Adam lr 1e-3, batch 256, up to 100 epochs, early stopping (patience 10) on validation accuracy; "
        "fine-tuning starts from the zero-shot head. λ-equitune is fine-tuned from three starts: the zero-shot "
        "head and λ-net; the zero-shot head with a new λ-net; the fine-tuned equitune head with uniform λ (a new "
        "λ-net whose last layer is zero). The table shows the start with the best validation accuracy: "
        + ", ".join(f"{g}: `{results['groups'][g]['fine_tuned']['lambda_selected']}`" for g in ("c4", "d4"))
        + f". This run: {timing['total_s'] / 60:.1f} min"
        + (
            " with the features read from the cache (about "
            f"{(timing['total_s'] - timing['features_s'] + timing['features_computed_s']) / 60:.0f} min "
            "from a cold cache)"
            if timing["features_s"] < 0.5 * timing["features_computed_s"]
            else ""
        )
        + f", on {m['cpu_model']} ({m['usable_cpus']} cores shared with other jobs; torch "
        f"{m['torch_version']}, {m['torch_num_threads']} threads).",
        "",
        "Reproduce (from the repository root; features are cached under `cache/features/`):",
        "",
        "```bash",
        results["command"],
        "```",
    ]
    if ship_info:
        lines += [
            "",
            f"Shipped as `models/{SHIP_NAME}/`: the `{ship_info['chosen']}` c4 head + λ-net (the best λ-equitune "
            f"validation accuracy on rotated images), equizero loss `{ship_info['zero_loss']}`"
            + (
                "; its best validated λ is uniform, so there `lambda` answers exactly as `equitune`"
                if ship_info["lambda_uniform"]
                else ""
            )
            + f". Served predictions on {ship_info['serve_check_images']} rotated uploads (decoded uint8 -> "
            "`pixels_from_uint8` -> fused pass) agree with the cached evaluation for "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in ship_info["served_vs_cached_agreement"].items())
            + f". Check it with `python -m app evaluate --model {SHIP_NAME}`.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "cache" / "features")
    p.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    p.add_argument("--no-ship", action="store_true", help=f"do not write models/{SHIP_NAME}")
    p.add_argument("--serve-check", type=int, default=300, help="rotated uploads run through the served model")
    p.add_argument("--out", type=Path, default=RESULTS / "transfer_fashion_mnist.json")
    p.add_argument("--md", type=Path, default=RESULTS / "transfer_fashion_mnist.md")
    p.add_argument("--from-json", type=Path, help="only rewrite the markdown table from this results file")
    args = p.parse_args(argv)
    if args.from_json:
        args.md.write_text(markdown(json.loads(args.from_json.read_text())))
        print(f"wrote {args.md}")
        return 0

    start = time.perf_counter()
    machine = machine_info()
    splits = load_splits(
        "fashion-mnist", train_size=args.train_size, val_size=args.val_size, test_size=args.test_size, seed=args.seed
    )
    assert splits.test is not None
    backbone = EfficientNetLite(0, pretrained=True, input_size=args.input_size)
    backbone.replace_head(splits.train.classes)  # features do not depend on the head
    use_fast_cpu_layout(backbone)
    cache, d4 = FeatureCache(args.cache_dir), image_group("d4")
    t = time.perf_counter()
    copies = {name: cache.load_or_compute(backbone, d4, data) for name, data in
              (("train", splits.train), ("val", splits.val), ("test", splits.test))}  # fmt: skip
    features_s = time.perf_counter() - t
    features_cold_s = sum(c.compute_seconds or 0.0 for c in copies.values())  # as computed, even if cached now
    print(f"features: {features_s:.1f} s for {sum(len(c) for c in copies.values())} images x 8 copies", flush=True)

    groups = {g: run_group(g, copies["train"], copies["val"], copies["test"], args.seed) for g in ("c4", "d4")}
    ship_info = None
    if not args.no_ship:
        ship_info = ship(groups["c4"], backbone, copies["val"].restrict(image_group("c4")), splits.test,
                         copies["test"], args)  # fmt: skip
    for g in groups.values():
        g.pop("_modules")
    command = "python bench/transfer_experiment.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    total_s = time.perf_counter() - start
    results: dict[str, Any] = {
        "command": command.strip(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine, "load_average_end": os.getloadavg()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "backbone": {"family": "efficientnet_lite", "variant": 0, "pretrained": "ImageNet-1k", "frozen": True},
        "timing": {"features_s": features_s, "features_computed_s": features_cold_s, "total_s": total_s},
        "groups": groups,
        "ship": ship_info,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.md.write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {args.out} and {args.md} in {total_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
of the first seed's best c4 configuration (by validation accuracy) are shipped as models/fashion-effnet-c4
and checked through the serving path on rotated uploads.

Every cell is run for several seeds (``--seeds``) and reported as per-seed values, mean ± std and
a 95% t-interval over seeds; the key claims get paired per-seed differences with their own
t-interval. What a seed varies (``seed_streams``, ``seed_split``): the head and λ-net
initialisation, the batch order and the random group element of every training image, the random
group elements of the validation and test images, and the 10000/2000 train/validation split of a
fixed 12000-image pool. Seed 0 keeps every stream and the split of the earlier single-seed run, the
one that shipped models/fashion-effnet-c4. The test set (all 10000 test images) and the frozen
backbone are the same for every seed, so the backbone features are computed once; the intervals
measure training randomness, not the sampling error of the test set.

Run from the repository root::

    python bench/transfer_experiment.py --no-ship  # 5 seeds, see the .md for the time it took
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import os
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
if str(REPO_ROOT / "bench") not in sys.path:  # benchlib, also when a test imports this file
    sys.path.insert(0, str(REPO_ROOT / "bench"))

import benchlib  # noqa: E402
from benchlib import CONFIDENCE, paired, t_interval  # noqa: E402

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
DEFAULT_SEEDS = (0, 1, 2, 3, 4)

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
GROUPS = ("c4", "d4")
SETTINGS = (("zero_shot", "zero-shot"), ("fine_tuned", "fine-tuned"))
METHOD_ORDER = ("vanilla", "equitune", "equizero_neg_max_prob", "equizero_entropy", "lambda")
TEST_SETS = (("upright", "upright"), ("random", "random g"), ("every", "every g"))

# The claims the write-up makes, each checked per seed as a paired difference a − b (same seed, same
# test images, same split): (setting of a, method of a, setting of b, method of b, test set, claim).
CLAIMS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("zero_shot", "lambda", "zero_shot", "vanilla", "random", "zero-shot: λ-equitune beats vanilla on rotated images"),
    ("zero_shot", "lambda", "zero_shot", "equitune", "random", "zero-shot: λ-equitune beats equitune"),
    ("zero_shot", "equitune", "zero_shot", "equizero_neg_max_prob", "random",
     "zero-shot: equitune beats equizero (−max p), unlike the paper"),
    ("zero_shot", "vanilla", "zero_shot", "lambda", "upright", "zero-shot: what λ-equitune costs on upright images"),
    ("fine_tuned", "equitune", "fine_tuned", "vanilla", "random", "fine-tuned: equitune beats vanilla"),
    ("fine_tuned", "lambda", "fine_tuned", "equitune", "random", "fine-tuned: λ-equitune vs equitune"),
    ("fine_tuned", "equitune", "fine_tuned", "equizero_neg_max_prob", "random",
     "fine-tuned: equitune beats equizero (−max p)"),
    ("fine_tuned", "equitune", "fine_tuned", "equizero_entropy", "random",
     "fine-tuned: equitune beats equizero (entropy)"),
    ("fine_tuned", "lambda", "zero_shot", "lambda", "random", "fine-tuning helps λ-equitune on rotated images"),
)  # fmt: skip


# -- what a seed varies ----------------------------------------------------------------------------------


def seed_streams(seed: int) -> dict[str, int]:
    """The torch seeds of one run. Seed 0 gives the streams of the earlier single-seed run (head and
    λ-net init 0, a fresh λ-net 1, training 0, test elements 0, validation elements 1), so that its
    numbers and the shipped model stay reproducible. Other seeds are spaced by 1000: with plain
    ``seed`` and ``seed + 1`` the fresh λ-net of seed s would draw from the head's stream of seed s + 1."""
    base = 1000 * seed
    return {"init": base, "fresh_lambda": base + 1, "train": base, "test": base, "val": base + 1}


def seed_split(n_pool: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices into the pool (the split's train images first, then its
    validation images). Seed 0 is the split itself; other seeds re-draw it from the same pool, so
    early stopping and the choice of λ start see a different validation set, without new features."""
    order = np.arange(n_pool) if seed == 0 else np.random.default_rng(seed).permutation(n_pool)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def subset(copies: CopyFeatures, indices: np.ndarray) -> CopyFeatures:
    index = torch.as_tensor(indices, dtype=torch.long)
    return CopyFeatures(copies.features[:, index], copies.labels[index], copies.group, copies.compute_seconds)


# -- statistics over seeds -------------------------------------------------------------------------------


def cell_accuracy(run: dict[str, Any], group: str, setting: str, method: str, test_set: str) -> float:
    """Top-1 % of one method in one seed's run; fine-tuned λ-equitune is that seed's selected start."""
    r = run["groups"][group]
    if setting == "zero_shot":
        return 100 * r["zero_shot"]["test"]["accuracy"][method][test_set]
    model = r["fine_tuned"]["lambda_selected"] if method == "lambda" else method
    return 100 * r["fine_tuned"][model]["test"]["accuracy"][method][test_set]


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per cell: per-seed values, mean, std, 95% t-interval; the paired claims; λ statistics."""
    seeds = list(runs)
    table: dict[str, Any] = {}
    for group in GROUPS:
        for setting, _ in SETTINGS:
            for test_set, _ in TEST_SETS:
                for method in METHOD_ORDER:
                    values = [cell_accuracy(runs[s], group, setting, method, test_set) for s in seeds]
                    table.setdefault(group, {}).setdefault(setting, {}).setdefault(test_set, {})[method] = t_interval(
                        values
                    )
    claims = []
    for group in GROUPS:
        for set_a, method_a, set_b, method_b, test_set, claim in CLAIMS:
            a = [cell_accuracy(runs[s], group, set_a, method_a, test_set) for s in seeds]
            b = [cell_accuracy(runs[s], group, set_b, method_b, test_set) for s in seeds]
            claims.append({"group": group, "claim": claim, "test_set": test_set, "a": [set_a, method_a],
                           "b": [set_b, method_b], **paired(a, b)})  # fmt: skip
    lambda_stats: dict[str, Any] = {}
    for group in GROUPS:
        for setting, _ in SETTINGS:
            reports = []
            for s in seeds:
                r = runs[s]["groups"][group]
                fine = r["fine_tuned"]
                reports.append(
                    r["zero_shot"]["test"] if setting == "zero_shot" else fine[fine["lambda_selected"]]["test"]
                )
            names = list(reports[0]["lambda_mean_weight"])
            lambda_stats.setdefault(group, {})[setting] = {
                "mean_weight": {k: t_interval([rep["lambda_mean_weight"][k] for rep in reports]) for k in names},
                "share_upright_max": t_interval([100 * rep["lambda_share_upright_max"] for rep in reports]),
            }
    selected = {g: [runs[s]["groups"][g]["fine_tuned"]["lambda_selected"] for s in seeds] for g in GROUPS}
    return {"seeds": [int(s) for s in seeds], "confidence": CONFIDENCE, "table": table, "claims": claims,
            "lambda": lambda_stats, "lambda_selected": selected}  # fmt: skip


# -- one seed ----------------------------------------------------------------------------------------------


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
    streams = seed_streams(seed)
    tr, va, te = train_d4.restrict(group), val_d4.restrict(group), test_d4.restrict(group)
    out: dict[str, Any] = {"group": group_name, "elements": group.names}
    print(f"[seed {seed}, {group_name}] zero-shot", flush=True)
    torch.manual_seed(streams["init"])
    head0 = nn.Linear(tr.features.shape[-1], 10)
    lam0 = LambdaNet(tr.features.shape[-1])
    head_log = train(tr, va, head0, lam0, "head on upright images (vanilla)", objective="vanilla",
                     train_lambda=False, seed=streams["train"])  # fmt: skip
    lam_log = train(tr, va, head0, lam0, "λ-net, head frozen", objective="lambda", train_head=False,
                    val_transform="random", seed=streams["train"])  # fmt: skip
    out["zero_shot"] = {
        "head_training": head_log,
        "lambda_training": lam_log,
        "test": evaluate_features(te, head0, lam0, seed=streams["test"]).to_dict(),
        "val_random": _val_random(va, head0, lam0, streams["val"]),
    }
    out["_modules"] = {"zero_shot": (head0, lam0)}

    print(
        f"[seed {seed}, {group_name}] fine-tuned (each method with its own objective, random group elements)",
        flush=True,
    )
    fine: dict[str, Any] = {}
    for name, objective, zero_loss, lambda_start in FINE_TUNED:
        trains_lambda = lambda_start is not None
        head, lam = copy.deepcopy(head0), copy.deepcopy(lam0)
        if lambda_start in ("fresh", "equitune"):
            torch.manual_seed(streams["fresh_lambda"])
            lam = LambdaNet(tr.features.shape[-1])
        if lambda_start == "equitune":
            head = copy.deepcopy(out["_modules"]["fine_tuned:equitune"][0])
            last = lam.mlp[-1]
            assert isinstance(last, nn.Linear)
            with torch.no_grad():  # log λ = 0 for every copy: uniform, and still learnable
                last.weight.zero_()
                last.bias.zero_()
        log = train(tr, va, head, lam, name, objective=objective, zero_loss=zero_loss, train_lambda=trains_lambda,
                    augment=True, seed=streams["train"])  # fmt: skip
        fine[name] = {
            "training": log,
            "test": evaluate_features(te, head, lam if trains_lambda else None, seed=streams["test"]).to_dict(),
            "val_random": _val_random(va, head, lam if trains_lambda else None, streams["val"]),
        }
        out["_modules"][f"fine_tuned:{name}"] = (head, lam)
    fine["lambda_selected"] = max(LAMBDA_VARIANTS, key=lambda k: fine[k]["val_random"]["lambda"])
    out["fine_tuned"] = fine
    return out


def _val_random(val: CopyFeatures, head: nn.Module, lam: LambdaNet | None, seed: int) -> dict[str, float]:
    """Validation accuracy of every method under random group elements (for model selection)."""
    report = evaluate_features(val, head, lam, seed=seed)
    return {name: acc["random"] for name, acc in report.accuracy.items()}


# -- shipping the best c4 configuration ------------------------------------------------------------------


def ship(
    c4: dict[str, Any],
    backbone: EfficientNetLite,
    val: CopyFeatures,
    test: ImageSet,
    test_copies: CopyFeatures,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    """Write the best c4 head + λ-net of one seed (by λ-equitune validation accuracy on rotated
    images), then check the served model on rotated uint8 uploads against the cached evaluation."""
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
    ks = torch.randint(4, (n,), generator=torch.Generator().manual_seed(seed_streams(seed)["test"] + 2))
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
    return {"seed": seed, "chosen": chosen, "candidates_val_lambda_random": candidates, "zero_loss": zero_loss.value,
            "lambda_uniform": lambda_uniform, "served_vs_cached_agreement": agree,
            "serve_check_images": n}  # fmt: skip


# -- tables ------------------------------------------------------------------------------------------------


def _pm(cell: dict[str, Any]) -> str:
    """``mean ± std (95% CI)``, in the table's % units."""
    if cell["std"] is None:
        return f"{cell['mean']:.1f}"
    return f"{cell['mean']:.1f} ± {cell['std']:.1f} ({cell['ci_low']:.1f}–{cell['ci_high']:.1f})"


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def markdown(results: dict[str, Any]) -> str:
    cfg, timing, summary = results["config"], results["timing"], results["summary"]
    m = results["machine"]
    seeds = summary["seeds"]
    n = len(seeds)
    table = summary["table"]
    binomial_half = 100 * 1.96 * math.sqrt(0.86 * 0.14 / cfg["test_size"])  # the normal approximation suffices here
    lines = [
        "# Transfer: ImageNet EfficientNet-Lite0 (frozen) -> Fashion-MNIST, c4 and d4",
        "",
        *(
            []
            if results.get("complete", True)
            else [f"**Partial**: {n} of the {len(cfg['seeds'])} requested seeds finished.", ""]
        ),
        f"Top-1 accuracy (%) on {cfg['test_size']} Fashion-MNIST test images over {n} seeds "
        f"({', '.join(map(str, seeds))}); heads and λ-nets trained on {cfg['train_size']} training images, "
        f"early-stopped on {cfg['val_size']} held-out training images; input {cfg['input_size']} px (28x28 "
        "grayscale replicated to RGB, the server's `pixels_from_uint8`). Test sets: upright; each image under a "
        "random group element (seeded); mean over every element.",
        "",
        "*Zero-shot*: one linear head trained on upright images only; λ-net trained with head and backbone "
        "frozen; every method uses that head. *Fine-tuned*: from there, each method fine-tunes the head "
        "(λ-equitune: head and λ-net) with its own objective on images under random group elements "
        "(equizero: straight-through estimator).",
        "",
        "**What a seed varies**: the head and λ-net initialisation; the batch order and the random group element "
        "of every training image; the random group elements of the validation and test images; and the "
        f"{cfg['train_size']}/{cfg['val_size']} train/validation split, re-drawn from one fixed pool of "
        f"{cfg['train_size'] + cfg['val_size']} training images (seed 0 is the original split and keeps every "
        "random stream of the earlier single-seed run). Not varied: the test images (all of them, every seed) "
        "and the frozen backbone. So the intervals measure training randomness, not the test set's sampling "
        f"error (a 95% binomial interval at 86% on {cfg['test_size']} images is about ±{binomial_half:.1f} points; "
        "it largely cancels in the paired differences below, which compare methods on the same images).",
        "",
        f"Cells: mean ± std over seeds ({CONFIDENCE:.0%} t-interval over seeds, t with {n - 1} degrees of "
        "freedom). No cell is bold: which differences are real is what the paired comparisons are for.",
        "",
        "| group | setting | test set | " + " | ".join(COLUMN_TITLES[k] for k in METHOD_ORDER) + " |",
        "|---|---|---|" + "---:|" * len(METHOD_ORDER),
    ]
    for group in GROUPS:
        for setting, setting_title in SETTINGS:
            for key, title in TEST_SETS:
                cells = [_pm(table[group][setting][key][method]) for method in METHOD_ORDER]
                lines.append(f"| {group} | {setting_title} | {title} | " + " | ".join(cells) + " |")

    lines += [
        "",
        f"## Paired comparisons (per-seed difference a − b, points; {CONFIDENCE:.0%} t-interval)",
        "",
        "Each seed's two numbers come from the same split, initial head, training streams and test "
        "elements, so the difference is taken seed by seed. *Separated*: the interval excludes 0.",
        "",
        "| group | claim | test set | per-seed a − b | mean ± std | 95% CI | separated |",
        "|---|---|---|---|---:|---:|---|",
    ]
    titles = dict(TEST_SETS)
    for c in summary["claims"]:
        diffs = ", ".join(_signed(d) for d in c["values"])
        if c["std"] is None:
            spread, interval, sep = f"{c['mean']:+.2f}", "-", "-"
        else:
            spread = f"{c['mean']:+.2f} ± {c['std']:.2f}"
            interval = f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"
            sep = "yes" if c["separated"] else "**no**"
        lines.append(f"| {c['group']} | {c['claim']} | {titles[c['test_set']]} | {diffs} | {spread} | {interval} "
                     f"| {sep} |")  # fmt: skip

    lines += [
        "",
        "## Per seed (random g test set, %)",
        "",
        "| group | setting | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | 95% CI |",
        "|---|---|---|" + "---:|" * (n + 2),
    ]
    for group in GROUPS:
        for setting, setting_title in SETTINGS:
            for method in METHOD_ORDER:
                c = table[group][setting]["random"][method]
                values = " | ".join(f"{v:.2f}" for v in c["values"])
                std = "-" if c["std"] is None else f"{c['std']:.2f}"
                ci = "-" if c["ci_low"] is None else f"{c['ci_low']:.2f}–{c['ci_high']:.2f}"
                lines.append(f"| {group} | {setting_title} | {COLUMN_TITLES[method]} | {values} | "
                             f"{c['mean']:.2f} ± {std} | {ci} |")  # fmt: skip

    lines += [
        "",
        "## λ statistics",
        "",
        "Upright test images; normalised λ per transform, mean over seeds (± std); the share of images whose "
        "largest λ is on the upright copy:",
        "",
        "| group | setting | mean λ per transform | largest λ on the upright copy |",
        "|---|---|---|---:|",
    ]
    lam = summary["lambda"]
    for group in GROUPS:
        for setting, setting_title in SETTINGS:
            s = lam[group][setting]
            weights = ", ".join(
                f"{k} {v['mean']:.2f}" + (f" ± {v['std']:.2f}" if v["std"] is not None else "")
                for k, v in s["mean_weight"].items()
            )
            share = s["share_upright_max"]
            share_txt = f"{share['mean']:.1f}%" + (f" ± {share['std']:.1f}" if share["std"] is not None else "")
            lines.append(f"| {group} | {setting_title} | {weights} | {share_txt} |")
    lines += [
        "",
        "Under d4 the λ-net splits its weight between `identity` and `hflip`: most Fashion-MNIST items are "
        "left-right symmetric, so both copies look upright. A uniform λ (the same weight on every copy) counts as "
        "0% here: then λ-equitune is equitune.",
        "",
        "Fine-tuned λ-equitune from each start (validation accuracy under random group elements, %; per seed, the "
        "start with the best one is the table's λ-equitune):",
        "",
        "| group | seed | " + " | ".join(f"`{v}`" for v in LAMBDA_VARIANTS) + " | equitune | selected |",
        "|---|---|" + "---:|" * 4 + "---|",
    ]
    for group in GROUPS:
        for s in seeds:
            fine = results["runs"][str(s)]["groups"][group]["fine_tuned"]
            cells = [f"{100 * fine[v]['val_random']['lambda']:.2f}" for v in LAMBDA_VARIANTS]
            equitune = 100 * fine["equitune"]["val_random"]["equitune"]
            chosen = fine["lambda_selected"]
            lines.append(f"| {group} | {s} | " + " | ".join(cells) + f" | {equitune:.2f} | `{chosen}` |")

    per_seed = ", ".join(f"{t / 60:.1f}" for t in timing["per_seed_s"].values())
    lines += [
        "",
        "## Setup",
        "",
        f"{cfg['train_size']} train / {cfg['val_size']} val / {cfg['test_size']} test images; seeds "
        f"{', '.join(map(str, seeds))}; {cfg['input_size']} px; backbone frozen, features of all 8 d4 copies of "
        f"the pool and the test set cached once ({timing['features_computed_s'] / 60:.1f} min to compute, as "
        "safetensors) and shared by every seed; c4 reads the first four. Training: Adam lr 1e-3, batch 256, up "
        "to 100 epochs, early stopping (patience 10) on validation accuracy; fine-tuning starts from the "
        "zero-shot head. λ-equitune is fine-tuned from three starts: the zero-shot head and λ-net; the zero-shot "
        "head with a new λ-net; the fine-tuned equitune head with uniform λ (a new λ-net whose last layer is "
        "zero); per seed, the start with the best validation accuracy is the table's.",
        "",
        f"This run: {results['timestamp']}, {timing['total_s'] / 60:.1f} min in all "
        f"(features {timing['features_s'] / 60:.1f} min"
        + (" read from the cache" if timing["features_s"] < 0.5 * timing["features_computed_s"] else "")
        + f"; per seed {per_seed} min), on {m['cpu_model']} ({m['usable_cpus']} cores shared with other jobs, "
        f"run under `nice -n 10`; torch {m['torch_version']}, {m['torch_num_threads']} thread"
        + ("s" if m["torch_num_threads"] != 1 else "")
        + f"; load average {m['load_average_start']} at the start, {m['load_average_end']} at the end).",
        "",
        "Reproduce (from the repository root; features are cached under `cache/features/`):",
        "",
        "```bash",
        _invocation(results),
        "```",
    ]
    ship_info = results.get("ship")
    if ship_info:
        lines += [
            "",
            f"Shipped as `models/{SHIP_NAME}/`: seed {ship_info['seed']}'s `{ship_info['chosen']}` c4 head + "
            f"λ-net (the best λ-equitune validation accuracy on rotated images), equizero loss "
            f"`{ship_info['zero_loss']}`"
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
    elif results.get("ship_note"):
        lines += ["", results["ship_note"]]
    return "\n".join(lines) + "\n"


def _invocation(results: dict[str, Any]) -> str:
    """The command as it was run: the thread count and niceness change the timing (and, in the last
    bits of float sums, the numbers), so they belong to the command."""
    m = results["machine"]
    prefix = [f"{k}={m[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in m]
    if m.get("niceness"):
        prefix.append(f"nice -n {m['niceness']}")
    return " ".join([*prefix, results["command"]])


SHIP_NOTE = (
    f"Not shipped by this run (`--no-ship`): `models/{SHIP_NAME}/` is the c4 `fine_tuned:lambda_from_equitune` "
    "head of the earlier single-seed run (2026-11-27), whose split and random streams are this run's seed 0."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--split-seed", type=int, default=0, help="the seed of the fixed train+val pool and test set")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="one run per seed")
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
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds: each seed once")

    started = benchlib.utc_now()
    start = time.perf_counter()
    load_start = benchlib.load_average()
    splits = load_splits("fashion-mnist", train_size=args.train_size, val_size=args.val_size,
                         test_size=args.test_size, seed=args.split_seed)  # fmt: skip
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
    # The pool every seed's split is drawn from: the split's train images, then its validation images.
    pool = CopyFeatures(torch.cat([copies["train"].features, copies["val"].features], dim=1),
                        torch.cat([copies["train"].labels, copies["val"].labels]), d4)  # fmt: skip
    del copies["train"], copies["val"]
    gc.collect()

    runs: dict[str, dict[str, Any]] = {}
    per_seed_s: dict[str, float] = {}
    ship_info = None
    for seed in args.seeds:
        t = time.perf_counter()
        train_idx, val_idx = seed_split(len(pool), args.train_size, seed)
        train_set, val_set = subset(pool, train_idx), subset(pool, val_idx)
        groups = {g: run_group(g, train_set, val_set, copies["test"], seed) for g in GROUPS}
        if not args.no_ship and seed == args.seeds[0]:
            ship_info = ship(groups["c4"], backbone, val_set.restrict(image_group("c4")), splits.test,
                             copies["test"], args, seed)  # fmt: skip
        for g in groups.values():
            g.pop("_modules")
        runs[str(seed)] = {"seed": seed, "streams": seed_streams(seed), "groups": groups,
                           "split_digest": _digest(train_idx)}  # fmt: skip
        per_seed_s[str(seed)] = time.perf_counter() - t
        print(f"seed {seed}: {per_seed_s[str(seed)] / 60:.1f} min", flush=True)
        del train_set, val_set
        gc.collect()
        # Written after every seed: a run cut short still leaves its finished seeds, marked as partial.
        command = "python bench/transfer_experiment.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        total_s = time.perf_counter() - start
        machine = {**benchlib.machine_info(), "load_average_start": load_start,
                   "load_average_end": benchlib.load_average(), "niceness": os.nice(0)}  # fmt: skip
        results: dict[str, Any] = {
            "command": command.strip(),
            "timestamp": started.isoformat(timespec="seconds"),
            "duration_s": round(total_s, 1),
            "complete": len(runs) == len(args.seeds),
            "machine": machine,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "backbone": {"family": "efficientnet_lite", "variant": 0, "pretrained": "ImageNet-1k", "frozen": True},
            "seed_varies": ["head and λ-net init", "batch order", "training group elements", "validation and test "
                            "group elements", "train/validation split of the fixed pool (seed 0: the original split)"],
            "seed_fixed": ["test images (all of them)", "the train+validation pool", "backbone and its features"],
            "timing": {"features_s": features_s, "features_computed_s": features_cold_s, "per_seed_s": per_seed_s,
                       "total_s": total_s},
            "summary": summarize(runs),
            "runs": runs,
            "ship": ship_info,
            "ship_note": None if ship_info else SHIP_NOTE,
        }  # fmt: skip
        benchlib.write_json(args.out, results)
        args.md.write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {args.out} and {args.md} in {total_s / 60:.1f} min")
    return 0


def _digest(indices: np.ndarray) -> str:
    """A short fingerprint of a seed's training indices (two seeds with one split would show it)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


if __name__ == "__main__":
    sys.exit(main())

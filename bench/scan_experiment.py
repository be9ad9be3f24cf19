"""SCAN (the paper's compositional-generalization experiment): the table of issue 13, one command.

For each split (Add Jump, Around Right), cell (GRU, LSTM) and seed (0, 1, 2):

1. pretrain the non-equivariant seq2seq on the split's training commands (``app.tasks.translate.training.pretrain``;
   the checkpoint with the best held-out accuracy);
2. zero-shot: vanilla, and per group equitune, equizero and λ-equitune (its λ-net trained on the frozen
   model: ``train_zero_shot_lambda``);
3. fine-tuned: a fixed number of steps from the pretrained model with each method (vanilla: plain
   training, the control; equizero straight-through; λ with its λ-net, from uniform);
4. exact-match accuracy on the whole test split and on the held-out part of the training split
   (in-distribution), with the served decoder.

Then mean ± std (population, over seeds) per row, with each group's ceiling (the share of the test
split with a copy inside the training split) beside it; ``bench/results/scan_table.{json,md}``.
Each (split, cell, seed) is cached under ``--work-dir`` (so a stopped run resumes); ``--export-models``
writes the best seed of each split x cell to ``models/`` (what ``python -m app train-scan`` writes).

Run from the repository root (2 processes on a 2-core machine)::

    nice -n 10 python bench/scan_experiment.py --jobs 2 --export-models
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `python bench/scan_experiment.py` finds `app` without installing it
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import load_average, markdown_table, report_header, utc_now, write_report  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
GROUPS = {"add_jump": ["verb", "verb4"], "around_right": ["direction"]}
SHIPPED_GROUPS = {"add_jump": ["verb4", "verb"], "around_right": ["direction"]}  # the first: the entry's own name
SPLIT_TITLES = {"add_jump": "Add Jump", "around_right": "Around Right"}
METHODS = ("equitune", "equizero", "lambda")
SHORT_TEST_WORDS = 3  # the third table: test commands of at most this many words


def run_unit(split_name: str, cell: str, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    """Everything of one (split, cell, seed), cached as ``<work>/<split>-<cell>-<seed>/unit.json``."""
    import torch

    from app.equivariance import Method
    from app.tasks.translate.groups import scan_group
    from app.tasks.translate.scan import split
    from app.tasks.translate.training import (
        FinetuneConfig,
        PretrainConfig,
        accuracy,
        config_dict,
        finetune,
        held_out_split,
        pretrain,
        save_module,
        train_zero_shot_lambda,
    )

    torch.set_num_threads(1)
    folder = Path(options["work_dir"]) / f"{split_name}-{cell}-{seed}"
    config = PretrainConfig(split=split_name, cell=cell, seed=seed)  # type: ignore[arg-type]
    if options["steps"]:
        config = replace(config, steps=options["steps"], eval_every=min(config.eval_every, options["steps"]))
    config = replace(config, **{k: options[k] for k in ("short_words", "short_repeats") if options[k] is not None})
    short = {"short_words": config.short_words, "short_repeats": config.short_repeats}  # fine-tuning: the same
    if (folder / "unit.json").is_file() and not options["fresh"]:
        cached = json.loads((folder / "unit.json").read_text())
        same = cached["pretrain"]["config"] == config_dict(config) and all(
            cached.get(k) == options[k] for k in ("lambda_steps", "finetune_steps", "limit")
        )
        if same:  # else the recipe changed since: run it again
            return cached
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    progress = options["progress"]
    pre = pretrain(config, progress=progress)
    save_module(pre.model, folder / "pretrained.safetensors")
    test = split(split_name).test
    _, held = held_out_split(split_name, config.held_out)
    if options["limit"]:  # smoke runs: the first commands only
        test, held = sorted(test)[: options["limit"]], sorted(held)[: options["limit"]]
    short_test = [p for p in test if len(p[0].split()) <= SHORT_TEST_WORDS]
    rows: list[dict[str, Any]] = []

    def evaluate(stage: str, method: str, group: str | None, model: Any, lambda_net: Any = None, **extra: Any) -> None:
        sequence_group = scan_group(group or GROUPS[split_name][0])
        kwargs = {"lambda_net": lambda_net}
        row = {
            "stage": stage,
            "method": method,
            "group": group,
            "test_accuracy": accuracy(model, sequence_group, test, method, **kwargs),
            "held_out_accuracy": accuracy(model, sequence_group, held, method, **kwargs),
            "test_short_accuracy": (
                accuracy(model, sequence_group, short_test, method, **kwargs) if short_test else None
            ),
            **extra,
        }
        rows.append(row)
        if progress:
            print(f"{split_name} {cell} seed {seed}: {row}", file=sys.stderr, flush=True)

    evaluate("zero-shot", "vanilla", None, pre.model)
    for group in GROUPS[split_name]:
        lam = train_zero_shot_lambda(pre, config, group, options["lambda_steps"], progress=progress, evaluate=False)
        assert lam.lambda_net is not None
        save_module(lam.lambda_net, folder / f"lambda-{group}.safetensors")
        for method in ("equitune", "equizero"):
            evaluate("zero-shot", method, group, pre.model)
        evaluate("zero-shot", "lambda", group, pre.model, lam.lambda_net, seconds=round(lam.seconds, 1))
    steps = options["finetune_steps"]
    tuned = finetune(
        pre.model,
        FinetuneConfig(Method.VANILLA, GROUPS[split_name][0], split_name, seed, steps, **short),
        progress=progress,
        evaluate=False,
    )
    evaluate("fine-tuned", "vanilla", None, tuned.model, seconds=round(tuned.seconds, 1))
    for group in GROUPS[split_name]:
        for method in METHODS:
            tuned = finetune(
                pre.model,
                FinetuneConfig(Method(method), group, split_name, seed, steps, **short),
                progress=progress,
                evaluate=False,
            )
            evaluate("fine-tuned", method, group, tuned.model, tuned.lambda_net, seconds=round(tuned.seconds, 1))
    unit = {
        "split": split_name,
        "cell": cell,
        "seed": seed,
        "pretrain": {
            "config": config_dict(config),
            "held_out_accuracy": pre.held_out_accuracy,
            "best_step": pre.best_step,
            "seconds": round(pre.seconds, 1),
            "curve": pre.curve,
        },
        "lambda_steps": options["lambda_steps"],
        "finetune_steps": steps,
        "limit": options["limit"],
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (folder / "unit.json").write_text(json.dumps(unit, indent=1))
    return unit


# ---------------------------------------------------------------------------------------
# Aggregation and the table
# ---------------------------------------------------------------------------------------


def ceilings() -> dict[str, dict[str, float]]:
    from app.tasks.translate.groups import ceiling, scan_group
    from app.tasks.translate.scan import split

    out: dict[str, dict[str, float]] = {}
    for split_name, groups in GROUPS.items():
        s = split(split_name)
        out[split_name] = {g: ceiling(scan_group(g), s.test_commands, s.train_commands) for g in groups}
    return out


FIELDS = {  # row key -> the table's title
    "test": "Test-split exact-match accuracy (%)",
    "held_out": "In-distribution accuracy (%)",
    "test_short": f"Test-split commands of 1-{SHORT_TEST_WORDS} words, exact-match accuracy (%)",
}


def aggregate(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (split, cell, stage, method, group): mean and std over the seeds of each field."""
    table: dict[tuple, dict[str, list[Any]]] = {}
    for unit in units:
        for row in unit["rows"]:
            key = (unit["split"], unit["cell"], row["stage"], row["method"], row["group"])
            entry = table.setdefault(key, {"seeds": [], **{f: [] for f in FIELDS}})
            for f in FIELDS:
                entry[f].append(row.get(f"{f}_accuracy"))
            entry["seeds"].append(unit["seed"])
    out = []
    for (split_name, cell, stage, method, group), values in table.items():
        entry: dict[str, Any] = {
            "split": split_name,
            "cell": cell,
            "stage": stage,
            "method": method,
            "group": group,
            "seeds": values["seeds"],
        }
        for f in FIELDS:
            if any(v is None for v in values[f]):  # not measured (no short commands under --limit)
                continue
            percent = np.array(values[f]) * 100
            entry[f"{f}_mean"], entry[f"{f}_std"] = round(float(percent.mean()), 2), round(float(percent.std()), 2)
        out.append(entry)
    return out


def _cell(entries: dict[tuple, dict[str, Any]], key: tuple, field: str) -> str:
    entry = entries.get(key)
    if entry is None or field + "_mean" not in entry:
        return "–"
    return f"{entry[field + '_mean']:.1f} ± {entry[field + '_std']:.1f}"


def markdown(report: dict[str, Any]) -> str:
    entries = {(e["split"], e["cell"], e["stage"], e["method"], e["group"]): e for e in report["aggregate"]}
    cells = report["cells"]
    columns = ["split", "group (ceiling)", "method"] + [
        f"{c.upper()} {stage}" for c in cells for stage in ("zero-shot", "fine-tuned")
    ]
    out = []
    for field, title in FIELDS.items():
        rows = []
        for split_name in report["splits"]:
            groups: list[str | None] = [None, *GROUPS[split_name]]
            for group in groups:
                ceiling = "–" if group is None else f"{group} ({100 * report['ceilings'][split_name][group]:.1f})"
                for method in ("vanilla",) if group is None else METHODS:
                    rows.append(
                        [SPLIT_TITLES[split_name], ceiling, method]
                        + [
                            _cell(entries, (split_name, c, stage, method, group), field)
                            for c in cells
                            for stage in ("zero-shot", "fine-tuned")
                        ]
                    )
        out.append(f"{title}, mean ± std over seeds {report['seeds']}:\n\n" + markdown_table(columns, rows))
    return "\n\n".join(out) + "\n"


def export_models(units: list[dict[str, Any]], work_dir: Path, models_dir: Path) -> list[str]:
    """The best seed (held-out accuracy) of each split x cell, with its zero-shot λ-nets, as models/ entries."""
    from safetensors.torch import load_file

    from app.equivariance.lambda_net import LambdaNet
    from app.tasks.translate.training import SPLIT_NAMES, PretrainConfig, TrainResult, best_run, load_seq2seq, ship

    written = []
    for split_name in SHIPPED_GROUPS:
        for cell in sorted({u["cell"] for u in units if u["split"] == split_name}):
            mine = {u["seed"]: u for u in units if u["split"] == split_name and u["cell"] == cell}
            runs = []
            for seed, u in sorted(mine.items()):
                p = u["pretrain"]
                model = load_seq2seq(work_dir / f"{split_name}-{cell}-{seed}" / "pretrained.safetensors", cell)
                runs.append(
                    (
                        PretrainConfig(**p["config"]),
                        TrainResult(model, p["held_out_accuracy"], p["best_step"], p["seconds"]),
                    )
                )
            best = mine[best_run(runs)[0].seed]
            lambda_nets = {}
            for group in SHIPPED_GROUPS[split_name]:
                state = load_file(str(work_dir / f"{split_name}-{cell}-{best['seed']}" / f"lambda-{group}.safetensors"))
                net = LambdaNet(int(state["mlp.0.weight"].shape[1]))
                net.load_state_dict(state)
                row = next(
                    r for r in best["rows"] if (r["stage"], r["method"], r["group"]) == ("zero-shot", "lambda", group)
                )
                info = {"steps": best["lambda_steps"], "held_out_accuracy": round(row["held_out_accuracy"], 4)}
                lambda_nets[group] = (net.eval(), info)
            name = f"scan-{cell}-{SPLIT_NAMES[split_name]}"
            written += [p.name for p in ship(runs, lambda_nets, models_dir, name)]
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--cells", nargs="+", default=["gru", "lstm"], choices=["gru", "lstm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: PretrainConfig's)")
    parser.add_argument("--short-words", type=int, default=None, help="commands this short are oversampled")
    parser.add_argument("--short-repeats", type=int, default=None, help="copies of each (1: none added)")
    parser.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps of every method")
    parser.add_argument("--lambda-steps", type=int, default=None, help="zero-shot λ-net steps (default: LAMBDA_STEPS)")
    parser.add_argument("--jobs", type=int, default=1, help="units run side by side (one process, one thread each)")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".cache" / "scan", help="per-unit cache")
    parser.add_argument("--fresh", action="store_true", help="ignore the cache")
    parser.add_argument("--out", type=Path, default=RESULTS / "scan_table", help="writes <out>.json and <out>.md")
    parser.add_argument("--export-models", action="store_true", help="write the best seeds to --models-dir")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on this many commands only (smoke runs)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    from app.tasks.translate.training import LAMBDA_STEPS

    started, load_start = utc_now(), load_average()
    options = {
        "work_dir": str(args.work_dir),
        "fresh": args.fresh,
        "steps": args.steps,
        "short_words": args.short_words,
        "short_repeats": args.short_repeats,
        "finetune_steps": args.finetune_steps,
        "lambda_steps": LAMBDA_STEPS if args.lambda_steps is None else args.lambda_steps,
        "progress": not args.quiet,
        "limit": args.limit,
    }
    jobs = [(s, c, seed) for s in args.splits for c in args.cells for seed in args.seeds]
    if args.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            units = list(pool.map(run_unit, *zip(*jobs, strict=True), [options] * len(jobs)))
    else:
        units = [run_unit(s, c, seed, options) for s, c, seed in jobs]
    report = {
        **report_header(
            "scan_table",
            started,
            "SCAN exact-match accuracy; one torch thread per process; ceilings: share of the test split "
            "with a copy inside the training split",
            load_start,
        ),
        "splits": args.splits,
        "cells": args.cells,
        "seeds": args.seeds,
        "options": {k: v for k, v in options.items() if k not in ("work_dir", "progress", "fresh")},
        "pretrain_config": units[0]["pretrain"]["config"] if units else None,
        "ceilings": ceilings(),
        "aggregate": aggregate(units),
        "units": units,
    }
    if args.export_models:
        report["exported"] = export_models(units, args.work_dir, args.models_dir)
    write_report(args.out.with_suffix(".json"), report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

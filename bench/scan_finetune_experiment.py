"""SCAN fine-tuning, the paper's recipe beside ours (issue 26): which objective, how long, which checkpoint.

For each split (Around Right with the direction group, Add Jump with the verb group), cell (GRU, LSTM,
the paper's RNN) and seed:

1. pretrain the non-equivariant seq2seq (``app.tasks.translate.training.pretrain``, as the shipped ones);
2. zero-shot: vanilla, equitune and equizero of the pretrained model;
3. fine-tune it with each run of ``RUNS`` (``recipe:method``; ``app.tasks.translate.training.recipe``):

   * ``paper``: the official code's loop: 10,000 single pairs, Adam (L2 1e-4) at the paper's per-split
     learning rate, teacher forcing on half of the steps (free running on the others: each copy fed its
     own greedy tokens), the NLL of the per-copy log-probabilities' average summed up to the first
     predicted end of sequence, equizero straight-through on it, the checkpoint of best held-out accuracy
     (every 100 steps);
   * ``selected``: the same, but equizero's loss is its selected copy's NLL (the gradient reaches g*);
   * ``augmented``: the same schedule, vanilla on group-augmented pairs (each pair replaced by g·x -> g·y
     for a random g): the control for "fine-tuning on g·x is augmentation", evaluated under vanilla,
     equitune and equizero;
   * ``mixture``: ours before: batches of 32, the mixture's NLL, equizero straight-through, no early
     stopping, run to 3,000 steps (the old table stopped at 300: the curve has that point);

4. exact-match accuracy of the selected (or last) checkpoint on the test split, the held-out part of
   the training split and the test split's 1-3 word commands; test accuracy along the way at the curve
   steps; a hash of the final weights (equal hashes: the same weights).

Then per row mean, std and the 95% t-interval over seeds, paired per-seed differences for the comparisons
that matter, and the learning curves: ``bench/results/scan_finetune.{json,md,png}``. Every run is cached
under ``--work-dir`` (a stopped run resumes; the report covers what is done, with its seed count).

Run from the repository root (2 processes on a 2-core machine)::

    nice -n 10 python bench/scan_finetune_experiment.py --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `python bench/scan_finetune_experiment.py` finds `app` uninstalled
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import load_average, markdown_table, report_header, t_interval, utc_now, write_report  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
GROUP = {"around_right": "direction", "add_jump": "verb"}
SPLIT_TITLES = {"add_jump": "Add Jump", "around_right": "Around Right"}
RUNS = (
    "paper:vanilla",
    "paper:equitune",
    "paper:equizero",
    "selected:equizero",
    "augmented:vanilla",
    "mixture:equitune",
    "mixture:equizero",
)
EVALUATED_AS = {"augmented": ("vanilla", "equitune", "equizero")}  # else: the run's own method
CURVE_STEPS = {"mixture": (300, 1000, 3000)}  # the others: PAPER_CURVE_STEPS
PAPER_CURVE_STEPS = (300, 1000, 3000, 10_000)
MIXTURE_STEPS = 3000
SHORT_TEST_WORDS = 3
# (name, minuend row, subtrahend row): rows are (stage or recipe, method, evaluated as)
COMPARISONS = (
    ("equizero: selected-copy NLL − paper", ("selected", "equizero", "equizero"), ("paper", "equizero", "equizero")),
    (
        "equizero: paper fine-tuned − zero-shot",
        ("paper", "equizero", "equizero"),
        ("zero-shot", "equizero", "equizero"),
    ),
    ("equizero − equitune, paper fine-tuned", ("paper", "equizero", "equizero"), ("paper", "equitune", "equitune")),
    ("equizero: paper − mixture (ours before)", ("paper", "equizero", "equizero"), ("mixture", "equizero", "equizero")),
    (
        "equitune fine-tuned − augmented vanilla decoded as equitune",
        ("paper", "equitune", "equitune"),
        ("augmented", "vanilla", "equitune"),
    ),
    (
        "augmented vanilla − plain vanilla fine-tuned (vanilla decoding)",
        ("augmented", "vanilla", "vanilla"),
        ("paper", "vanilla", "vanilla"),
    ),
)


def weights_hash(model: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _eval_sets(split_name: str, limit: int | None) -> dict[str, list]:
    from app.tasks.translate.scan import split
    from app.tasks.translate.training import PretrainConfig, held_out_split

    test = sorted(split(split_name).test)
    _, held = held_out_split(split_name, PretrainConfig.held_out)  # the part every recipe selects on
    if limit:  # smoke runs: the first commands only
        test, held = test[:limit], sorted(held)[:limit]
    return {"test": test, "held_out": held, "test_short": [p for p in test if len(p[0].split()) <= SHORT_TEST_WORDS]}


def _evaluate(model: Any, group: str, method: str, sets: dict[str, list], lambda_net: Any = None) -> dict[str, float]:
    from app.tasks.translate.groups import scan_group
    from app.tasks.translate.training import accuracy

    sequence_group = scan_group(group)
    return {
        f"{name}_accuracy": accuracy(model, sequence_group, pairs, method, lambda_net=lambda_net)
        for name, pairs in sets.items()
        if pairs
    }


def _as_json(value: Any) -> Any:
    """``value`` as its cache file reads back (tuples become lists), to compare a recipe with the cached one."""
    return json.loads(json.dumps(value))


def unit_dir(options: dict[str, Any], split_name: str, cell: str, seed: int) -> Path:
    return Path(options["work_dir"]) / f"{split_name}-{cell}-{seed}"


def pretrain_unit(split_name: str, cell: str, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    """The pretrained model of (split, cell, seed) and its zero-shot rows, cached."""
    import torch

    from app.tasks.translate.training import PretrainConfig, config_dict, pretrain, save_module

    torch.set_num_threads(1)
    folder = unit_dir(options, split_name, cell, seed)
    config = PretrainConfig(split=split_name, cell=cell, seed=seed)  # type: ignore[arg-type]
    if options["pretrain_steps"]:
        steps = options["pretrain_steps"]
        config = replace(config, steps=steps, eval_every=min(config.eval_every, steps))
    cache = folder / "pretrain.json"
    if cache.is_file() and json.loads(cache.read_text())["config"] == _as_json(config_dict(config)):
        return json.loads(cache.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    result = pretrain(config, progress=options["progress"])
    save_module(result.model, folder / "pretrained.safetensors")
    sets = _eval_sets(split_name, options["limit"])
    rows = [
        {"stage": "zero-shot", "method": m, "evaluated_as": m, **_evaluate(result.model, GROUP[split_name], m, sets)}
        for m in ("vanilla", "equitune", "equizero")
    ]
    record = {
        "config": config_dict(config),
        "held_out_accuracy": result.held_out_accuracy,
        "best_step": result.best_step,
        "seconds": round(result.seconds, 1),
        "weights": weights_hash(result.model),
        "rows": rows,
    }
    cache.write_text(json.dumps(record, indent=1))
    return record


def run_one(split_name: str, cell: str, seed: int, run: str, options: dict[str, Any]) -> dict[str, Any]:
    """One fine-tuning run ``recipe:method`` from the unit's pretrained model, cached."""
    import torch

    from app.equivariance import Method
    from app.tasks.translate.training import config_dict, finetune, load_seq2seq, recipe

    torch.set_num_threads(1)
    recipe_name, method = run.split(":")
    folder = unit_dir(options, split_name, cell, seed)
    group = GROUP[split_name]
    overrides: dict[str, Any] = {"curve_steps": CURVE_STEPS.get(recipe_name, PAPER_CURVE_STEPS)}
    if recipe_name == "mixture":
        overrides["steps"] = MIXTURE_STEPS
    if options["steps"]:  # smoke runs
        overrides["steps"] = options["steps"]
        overrides["curve_steps"] = tuple(s for s in overrides["curve_steps"] if s <= options["steps"])
        if recipe_name != "mixture":
            overrides["eval_every"] = max(1, options["steps"] // 2)
    config = recipe(recipe_name, Method(method), group, split_name, seed, **overrides)
    cache = folder / f"{recipe_name}-{method}.json"
    if cache.is_file() and json.loads(cache.read_text())["config"] == _as_json(config_dict(config)):
        return json.loads(cache.read_text())
    pretrained = load_seq2seq(folder / "pretrained.safetensors", cell)
    sets = _eval_sets(split_name, options["limit"])
    started = time.perf_counter()
    result = finetune(
        pretrained, config, progress=options["progress"], evaluate=False, curve_sets={"test": sets["test"]}
    )
    rows = [
        {
            "stage": recipe_name,
            "method": method,
            "evaluated_as": as_method,
            **_evaluate(result.model, group, as_method, sets, result.lambda_net),
        }
        for as_method in EVALUATED_AS.get(recipe_name, (method,))
    ]
    record = {
        "split": split_name,
        "cell": cell,
        "seed": seed,
        "run": run,
        "config": config_dict(config),
        "best_step": result.best_step,
        "selection_held_out_accuracy": result.held_out_accuracy,
        "weights": weights_hash(result.model),
        "seconds": round(time.perf_counter() - started, 1),
        "curve": result.curve,
        "rows": rows,
    }
    cache.write_text(json.dumps(record, indent=1))
    if options["progress"]:
        print(f"{split_name} {cell} seed {seed} {run}: {rows}", file=sys.stderr, flush=True)
    return record


# ---------------------------------------------------------------------------------------
# Aggregation, tables and curves
# ---------------------------------------------------------------------------------------

FIELDS = ("test", "held_out", "test_short")


def collect(pretrained: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[tuple, dict[int, dict[str, Any]]]:
    """(split, cell, stage, method, evaluated as) -> seed -> the row (with best step and weights hash)."""
    table: dict[tuple, dict[int, dict[str, Any]]] = {}
    for unit in pretrained:
        c = unit["config"]
        for row in unit["rows"]:
            key = (c["split"], c["cell"], row["stage"], row["method"], row["evaluated_as"])
            table.setdefault(key, {})[c["seed"]] = {**row, "best_step": 0, "weights": unit["weights"]}
    for run in runs:
        for row in run["rows"]:
            key = (run["split"], run["cell"], row["stage"], row["method"], row["evaluated_as"])
            table.setdefault(key, {})[run["seed"]] = {**row, "best_step": run["best_step"], "weights": run["weights"]}
    return table


def aggregate(table: dict[tuple, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for (split_name, cell, stage, method, as_method), by_seed in table.items():
        entry: dict[str, Any] = {
            "split": split_name,
            "cell": cell,
            "stage": stage,
            "method": method,
            "evaluated_as": as_method,
            "seeds": sorted(by_seed),
            "best_steps": [by_seed[s]["best_step"] for s in sorted(by_seed)],
            "weights": [by_seed[s]["weights"] for s in sorted(by_seed)],
        }
        for field in FIELDS:
            values = [
                100 * by_seed[s][f"{field}_accuracy"] for s in sorted(by_seed) if f"{field}_accuracy" in by_seed[s]
            ]
            entry[field] = {"per_seed": [round(v, 2) for v in values], **_rounded(t_interval(values))}
        out.append(entry)
    return out


def _rounded(stats: dict[str, Any]) -> dict[str, Any]:
    def r(v: Any) -> Any:
        return [round(x, 2) for x in v] if isinstance(v, list) else (round(v, 2) if isinstance(v, float) else v)

    return {k: r(v) for k, v in stats.items()}


def paired(table: dict[tuple, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per split x cell, each comparison's per-seed test-accuracy differences (same seed = same pretrained
    model) and their 95% t-interval; ``separated``: the interval excludes 0."""
    out = []
    for split_name, cell in sorted({(k[0], k[1]) for k in table}):
        for name, a, b in COMPARISONS:
            rows_a, rows_b = table.get((split_name, cell, *a), {}), table.get((split_name, cell, *b), {})
            seeds = sorted(set(rows_a) & set(rows_b))
            if not seeds:
                continue
            diffs = [100 * (rows_a[s]["test_accuracy"] - rows_b[s]["test_accuracy"]) for s in seeds]
            stats = _rounded(t_interval(diffs))
            separated = stats["ci_low"] is not None and (stats["ci_low"] > 0 or stats["ci_high"] < 0)
            out.append(
                {
                    "split": split_name,
                    "cell": cell,
                    "comparison": name,
                    "seeds": seeds,
                    "per_seed": [round(d, 2) for d in diffs],
                    **stats,
                    "separated": separated,
                }
            )
    return out


def curves(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """``split cell`` -> ``recipe:method`` -> [step, mean test accuracy (%), number of seeds] rows."""
    points: dict[tuple, dict[int, list[float]]] = {}
    for run in runs:
        for p in run["curve"]:
            if "test_accuracy" in p:
                key = (f"{run['split']} {run['cell']}", run["run"])
                points.setdefault(key, {}).setdefault(p["step"], []).append(100 * p["test_accuracy"])
    out: dict[str, dict[str, list[list[float]]]] = {}
    for (unit, run), by_step in sorted(points.items()):
        out.setdefault(unit, {})[run] = [
            [step, round(sum(v) / len(v), 2), len(v)] for step, v in sorted(by_step.items())
        ]
    return out


def plot_curves(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = report["curves"]
    if not units:
        return
    fig, axes = plt.subplots(1, len(units), figsize=(5.5 * len(units), 4), squeeze=False)
    for ax, (unit, runs) in zip(axes[0], units.items(), strict=True):
        for run, rows in runs.items():
            ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=run)
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel("test exact match (%), mean over seeds")
        split_name, cell = unit.split()
        ax.set_title(f"{SPLIT_TITLES.get(split_name, split_name)} {cell.upper()}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(stats: dict[str, Any]) -> str:
    if stats.get("mean") is None or stats.get("n", 0) == 0:
        return "–"
    if stats.get("ci_low") is None:
        return f"{stats['mean']:.1f} (1 seed)"
    lo, hi = stats["ci_low"], stats["ci_high"]
    return f"{stats['mean']:.1f} ± {stats['std']:.1f} [{lo:.1f}, {hi:.1f}]"


STAGE_ORDER = ("zero-shot", "paper", "selected", "augmented", "mixture")
METHOD_ORDER = ("vanilla", "equitune", "equizero")


def markdown(report: dict[str, Any]) -> str:
    out = [
        "# SCAN fine-tuning: the paper's recipe beside ours\n",
        f"Machine: {report['machine'].get('cpu_model', '?')}, one torch thread per process; "
        f"{report['timestamp']}; {report['duration_s']} s of this invocation (cached runs are not re-run). "
        f"Command: `{report['command']}`\n",
        "Exact-match accuracy (%) of the selected checkpoint (paper, selected, augmented: best held-out "
        "accuracy under the method, every 100 steps of 10,000; mixture: the last of 3,000 steps); "
        "mean ± sample std [95% t-interval] over seeds. Recipes: see the script's docstring and docs/scan.md.\n",
    ]
    entries = sorted(
        report["aggregate"],
        key=lambda e: (
            e["split"],
            e["cell"],
            STAGE_ORDER.index(e["stage"]),
            METHOD_ORDER.index(e["method"]),
            METHOD_ORDER.index(e["evaluated_as"]),
        ),
    )
    for split_name, cell in sorted({(e["split"], e["cell"]) for e in entries}):
        rows = []
        for e in (e for e in entries if (e["split"], e["cell"]) == (split_name, cell)):
            rows.append(
                [
                    e["stage"],
                    e["method"],
                    e["evaluated_as"],
                    str(len(e["seeds"])),
                    _fmt(e["test"]),
                    _fmt(e["held_out"]),
                    _fmt(e["test_short"]),
                    ", ".join(map(str, e["test"]["per_seed"])),
                    ", ".join(map(str, e["best_steps"])),
                ]
            )
        title = f"## {SPLIT_TITLES.get(split_name, split_name)}, {cell.upper()}, group {GROUP.get(split_name)}\n"
        columns = ["recipe", "trained as", "decoded as", "seeds", "test", "held-out", "test 1-3 words"]
        columns += ["test per seed", "selected step per seed"]
        out.append(title + "\n" + markdown_table(columns, rows) + "\n")
    comparisons = report["paired"]
    if comparisons:
        rows = [
            [
                f"{SPLIT_TITLES.get(c['split'], c['split'])} {c['cell'].upper()}",
                c["comparison"],
                str(c["n"]),
                ", ".join(map(str, c["per_seed"])),
                _fmt(c),
                "yes" if c["separated"] else "no",
            ]
            for c in comparisons
        ]
        columns = ["split, cell", "test-accuracy difference", "seeds", "per seed", "mean ± std [95% CI]"]
        columns += ["CI excludes 0"]
        out.append("## Paired differences (same seed, same pretrained model)\n\n" + markdown_table(columns, rows))
    curve_rows = []
    for unit, runs in report["curves"].items():
        for run, points in runs.items():
            curve_rows.append([unit, run, "; ".join(f"{int(s)}: {a:.1f} (n={int(n)})" for s, a, n in points)])
    if curve_rows:
        out.append(
            "## Learning curves: test accuracy (%) at fine-tuning steps, mean over seeds\n\n"
            + markdown_table(["split cell", "run", "step: accuracy"], curve_rows)
            + "\n\nThe curves are the model at that step, not the selected checkpoint: bench/results/scan_finetune.png."
        )
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", nargs="+", default=["around_right"], choices=list(GROUP))
    parser.add_argument("--cells", nargs="+", default=["gru"], choices=["gru", "lstm", "rnn"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="recipe:method")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (one process, one thread each)")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".cache" / "scan-finetune")
    parser.add_argument("--out", type=Path, default=RESULTS / "scan_finetune", help="writes <out>.json/.md/.png")
    parser.add_argument("--report-only", action="store_true", help="aggregate the cached runs of every unit")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="smoke runs only")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps of every run (smoke runs only)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on this many commands (smoke runs only)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    started, load_start = utc_now(), load_average()
    options = {
        "work_dir": str(args.work_dir),
        "pretrain_steps": args.pretrain_steps,
        "steps": args.steps,
        "limit": args.limit,
        "progress": not args.quiet,
    }
    units = [(s, c, seed) for s in args.splits for c in args.cells for seed in args.seeds]
    jobs = [(*u, run) for u in units for run in args.runs]
    if not args.report_only:
        if args.jobs > 1:
            import multiprocessing

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(pretrain_unit, *zip(*units, strict=True), [options] * len(units)))
                list(pool.map(run_one, *zip(*jobs, strict=True), [options] * len(jobs)))
        else:
            for u in units:
                pretrain_unit(*u, options)
            for j in jobs:
                run_one(*j, options)
    pretrained = [json.loads(p.read_text()) for p in sorted(args.work_dir.glob("*/pretrain.json"))]
    runs = [
        json.loads(p.read_text())
        for p in sorted(args.work_dir.glob("*/*.json"))
        if p.name != "pretrain.json" and p.stem.replace("-", ":", 1) in RUNS
    ]
    if not args.report_only:  # only the units and runs asked for
        wanted = {(s, c, seed) for s, c, seed in units}
        pretrained = [
            u for u in pretrained if (u["config"]["split"], u["config"]["cell"], u["config"]["seed"]) in wanted
        ]
        runs = [r for r in runs if (r["split"], r["cell"], r["seed"]) in wanted and r["run"] in args.runs]
    table = collect(pretrained, runs)
    report = {
        **report_header(
            "scan_finetune",
            started,
            "SCAN exact match; one torch thread per process, nice 10, other jobs on the machine",
            load_start,
        ),
        "options": {k: v for k, v in options.items() if k not in ("work_dir", "progress")},
        "aggregate": aggregate(table),
        "paired": paired(table),
        "curves": curves(runs),
        "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs],
    }
    write_report(args.out.with_suffix(".json"), report, markdown(report))
    plot_curves(report, args.out.with_suffix(".png"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

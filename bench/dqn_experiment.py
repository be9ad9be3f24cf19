"""Equivariant deep Q-learning (the paper's RL experiment) on CartPole-v1, Acrobot-v1 and our C4 grid world.

Three experiments, one command each, all seeded (stable-baselines3 DQN, CPU, one torch thread):

* ``zeroshot``: each shipped, normally trained agent (models/dqn-*) wrapped by each method; greedy
  returns over seeded episodes. ``lambda`` uses the entry's λ-net (trained on the frozen agent,
  see docs/dqn.md), or a uniform one if it has none (then it equals equitune).
* ``finetune``: from each shipped agent, each method fine-tunes the Q-network (λ-equitune: with
  its λ-net, from uniform) for a fixed number of environment steps; training-episode return
  curves over seeds (PNG) and the final greedy return (table).
* ``scratch``: from random weights, equivariant (equitune) against vanilla DQN; greedy
  evaluation every few thousand steps, steps until the environment's solved threshold.
* ``frames``: a frame strip of the shipped CartPole agent (gymnasium ``rgb_array``) for docs/.

Run from the repository root::

    nice -n 10 python bench/dqn_experiment.py zeroshot
    nice -n 10 python bench/dqn_experiment.py finetune
    nice -n 10 python bench/dqn_experiment.py scratch
    python bench/dqn_experiment.py frames
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `python bench/dqn_experiment.py` finds `app` without installing it
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import load_average, markdown_table, print_table, report_header, utc_now, write_json  # noqa: E402
from tables import header  # noqa: E402

from app.equivariance.methods import Method  # noqa: E402
from app.tasks.act.envs import make_env, solved_threshold  # noqa: E402
from app.tasks.act.model import ActModel  # noqa: E402
from app.tasks.act.spec import ActSpec  # noqa: E402
from app.tasks.act.training import DQNConfig, evaluate, train_dqn  # noqa: E402
from app.tasks.base import LoadOptions  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
MODELS = REPO_ROOT / "models"
AGENTS = {"CartPole-v1": "dqn-cartpole", "Acrobot-v1": "dqn-acrobot", "equiserve/GridWorldC4-v0": "dqn-grid"}
SHORT = {"CartPole-v1": "CartPole", "Acrobot-v1": "Acrobot", "equiserve/GridWorldC4-v0": "Grid (C4)"}
METHODS = [Method.VANILLA, Method.EQUITUNE, Method.EQUIZERO, Method.LAMBDA]
TITLES = {
    Method.VANILLA: "vanilla",
    Method.EQUITUNE: "equitune",
    Method.EQUIZERO: "equizero",
    Method.LAMBDA: "λ-equitune",
}
# Environment steps of a fine-tuning run, and the from-scratch cap / evaluation interval: sized so that all
# three experiments together stay well under an hour on 2 shared CPU cores (see docs/dqn.md).
FINETUNE_STEPS = {"CartPole-v1": 10_000, "Acrobot-v1": 5_000, "equiserve/GridWorldC4-v0": 10_000}
SCRATCH = {  # (cap, evaluate every, seeds): Acrobot's steps cost the most (one gradient step each)
    "CartPole-v1": (40_000, 2_500, 3),
    "Acrobot-v1": (20_000, 2_500, 2),
    "equiserve/GridWorldC4-v0": (60_000, 5_000, 3),
}
ZERO_SHOT_SEED = 2_000_000  # evaluation episodes use seeds no training run saw
FINAL_EVAL_EPISODES = 10


def load_agent(env_id: str) -> ActModel:
    folder = MODELS / AGENTS[env_id]
    import yaml

    spec = ActSpec.model_validate({**yaml.safe_load((folder / "model.yaml").read_text()), "name": folder.name})
    return ActModel.load(folder, spec, LoadOptions(device="cpu"))


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 3), "std": round(float(np.std(values)), 3)}


def pm(stats: dict[str, float], digits: int = 1) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def digits(env_id: str) -> int:
    return 2 if env_id.startswith("equiserve/") else 1


def save(name: str, report: dict[str, Any], markdown: str) -> None:
    write_json(RESULTS / f"{name}.json", report)
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(f"wrote {RESULTS / f'{name}.md'}", file=sys.stderr)


# -- (a) zero-shot -----------------------------------------------------------------------------------
def zeroshot(args: argparse.Namespace) -> None:
    started, load_start = utc_now(), load_average()
    results: dict[str, Any] = {}
    for env_id in AGENTS:
        runner = load_agent(env_id)
        results[env_id] = {"lambda_trained": runner.lambda_trained, "methods": {}}
        for method in METHODS:
            returns = evaluate(runner.model, env_id, method, args.episodes, seed=ZERO_SHOT_SEED)
            results[env_id]["methods"][method.value] = {**mean_std(returns), "returns": returns}
            print(f"{env_id} {method.value}: {pm(mean_std(returns), digits(env_id))}", file=sys.stderr)
    report = {
        **report_header("dqn_zeroshot", started, "greedy returns of the shipped agents, each method", load_start),
        "episodes": args.episodes,
        "seeds": f"{ZERO_SHOT_SEED}..{ZERO_SHOT_SEED + args.episodes - 1}",
        "solved_threshold": {e: solved_threshold(e) for e in AGENTS},
        "results": results,
    }
    rows = [
        [SHORT[e], f"{solved_threshold(e):g}"]
        + [pm(results[e]["methods"][m.value], digits(e)) for m in METHODS]
        + ["trained, Q frozen" if results[e]["lambda_trained"] else "uniform (= equitune)"]
        for e in AGENTS
    ]
    columns = ["environment", "solved at", *[TITLES[m] for m in METHODS], "λ-net"]
    print_table("zero-shot greedy return (mean ± std)", columns, rows)
    md = (
        f"# DQN zero-shot: shipped agents wrapped by each method\n\n{header(report)}\n\n"
        f"Greedy return, mean ± std over {args.episodes} seeded episodes per cell (seeds {report['seeds']}).\n\n"
        + markdown_table(columns, rows)
    )
    save("dqn_zeroshot", report, md)


# -- (b) fine-tuning ---------------------------------------------------------------------------------
def binned(episodes: list[tuple[int, float]], steps: int, bins: int) -> list[float | None]:
    """Mean return of the training episodes that ended in each of ``bins`` equal step windows."""
    width = steps / bins
    out: list[float | None] = []
    for b in range(bins):
        inside = [r for s, r in episodes if b * width < s <= (b + 1) * width]
        out.append(float(np.mean(inside)) if inside else None)
    return out


def finetune(args: argparse.Namespace) -> None:
    started, load_start = utc_now(), load_average()
    results: dict[str, Any] = {}
    for env_id in args.envs:
        steps = FINETUNE_STEPS[env_id]
        results[env_id] = {"steps": steps, "methods": {}}
        for method in METHODS:
            runs = []
            for seed in range(args.seeds):
                config = DQNConfig(env_id, method, steps=steps, seed=seed, init=MODELS / AGENTS[env_id])
                t = time.perf_counter()
                result = train_dqn(config, progress_bar=not args.quiet)
                final = evaluate(result.model, env_id, method, FINAL_EVAL_EPISODES, seed=ZERO_SHOT_SEED)
                runs.append({
                    "seed": seed,
                    "episodes": result.episodes,
                    "curve": binned(result.episodes, steps, args.bins),
                    "final_greedy": mean_std(final),
                    "seconds": round(time.perf_counter() - t, 1),
                })  # fmt: skip
                print(f"{env_id} {method.value} seed {seed}: final {pm(mean_std(final))}", file=sys.stderr)
            last = [float(np.mean([r for s, r in run["episodes"] if s > 0.75 * steps] or [np.nan])) for run in runs]
            results[env_id]["methods"][method.value] = {
                "runs": runs,
                "last_quarter_training_return": mean_std(last),
                "final_greedy_return": mean_std([run["final_greedy"]["mean"] for run in runs]),
            }
    report = {
        **report_header("dqn_finetune", started, "fine-tuning the shipped agents with each method", load_start),
        "seeds": args.seeds,
        "bins": args.bins,
        "final_eval_episodes": FINAL_EVAL_EPISODES,
        "results": results,
    }
    plot_curves(results, args.bins, RESULTS / "dqn_finetune.png")
    columns = ["environment", "steps", "statistic", *[TITLES[m] for m in METHODS]]
    rows = []
    for env_id, r in results.items():
        d = digits(env_id)
        for key, title in (("last_quarter_training_return", "training episodes, last 25%"),
                           ("final_greedy_return", f"greedy after ({FINAL_EVAL_EPISODES} ep.)")):  # fmt: skip
            rows.append([SHORT[env_id], str(r["steps"]), title] + [pm(r["methods"][m.value][key], d) for m in METHODS])
    print_table("fine-tuning (mean ± std over seeds)", columns, rows)
    md = (
        f"# DQN fine-tuning from the shipped agents\n\n{header(report)}\n\n"
        f"Each method fine-tunes the shipped agent for a fixed number of environment steps (ε = 0.05 throughout), "
        f"{args.seeds} seeds; mean ± std over seeds of (i) the mean return of the training episodes in the last "
        f"quarter of the run and (ii) the greedy return after it, over {FINAL_EVAL_EPISODES} seeded episodes. "
        "Curves: bench/results/dqn_finetune.png.\n\n" + markdown_table(columns, rows)
    )
    save("dqn_finetune", report, md)


def plot_curves(results: dict[str, Any], bins: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, (env_id, r) in zip(axes[0], results.items(), strict=True):
        x = (np.arange(bins) + 1) * r["steps"] / bins
        for method in METHODS:
            curves = np.array(
                [[np.nan if v is None else v for v in run["curve"]] for run in r["methods"][method.value]["runs"]]
            )
            mean, std = np.nanmean(curves, 0), np.nanstd(curves, 0)
            ax.plot(x, mean, label=TITLES[method], marker="o", markersize=3)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        ax.set_title(f"{SHORT[env_id]} (solved: {solved_threshold(env_id):g})")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("training episode return")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


# -- (c) from scratch ----------------------------------------------------------------------------------
SCRATCH_METHODS = [Method.VANILLA, Method.EQUITUNE]


def scratch(args: argparse.Namespace) -> None:
    started, load_start = utc_now(), load_average()
    results: dict[str, Any] = {}
    for env_id in args.envs:
        cap, every, seeds = SCRATCH[env_id]
        seeds = args.seeds or seeds
        results[env_id] = {"cap": cap, "eval_every": every, "seeds": seeds, "threshold": solved_threshold(env_id),
                           "methods": {}}  # fmt: skip
        for method in SCRATCH_METHODS:
            runs = []
            for seed in range(seeds):
                config = DQNConfig(env_id, method, steps=cap, seed=seed, eval_every=every, eval_episodes=5,
                                   stop_when_solved=True)  # fmt: skip
                result = train_dqn(config, progress_bar=not args.quiet)
                runs.append({"seed": seed, "solved_at": result.solved_at, "evaluations": result.evaluations,
                             "seconds": round(result.seconds, 1)})  # fmt: skip
                print(f"{env_id} {method.value} seed {seed}: solved at {result.solved_at}", file=sys.stderr)
            solved = [run["solved_at"] for run in runs]
            results[env_id]["methods"][method.value] = {
                "runs": runs,
                "solved_runs": sum(s is not None for s in solved),
                # unsolved runs count as the cap: the median is then a lower bound
                "median_steps": float(np.median([s if s is not None else cap for s in solved])),
            }
    report = {
        **report_header("dqn_scratch", started, "from scratch: steps to the solved threshold", load_start),
        "eval_episodes": 5,
        "results": results,
    }
    columns = ["environment", "solved at", "cap", *[TITLES[m] for m in SCRATCH_METHODS]]
    rows = []
    for env_id, r in results.items():
        cells = []
        for m in SCRATCH_METHODS:
            entry = r["methods"][m.value]
            per_seed = ", ".join(str(run["solved_at"]) if run["solved_at"] else f">{r['cap']}" for run in entry["runs"])
            cells.append(f"{entry['median_steps']:.0f} ({per_seed})")
        rows.append([SHORT[env_id], f"{r['threshold']:g}", str(r["cap"]), *cells])
    print_table("from scratch: environment steps to solved (median; per seed)", columns, rows)
    md = (
        f"# DQN from scratch: steps to the solved threshold\n\n{header(report)}\n\n"
        f"Same hyperparameters for every method; greedy evaluation (5 seeded episodes) every few thousand steps; "
        f"a run stops at its first evaluation whose mean reaches the threshold. Median over the seeds "
        "(an unsolved run counts as the cap, so such a median is a lower bound), then each seed.\n\n"
        + markdown_table(columns, rows)
    )
    save("dqn_scratch", report, md)


# -- frames --------------------------------------------------------------------------------------------
def frames(args: argparse.Namespace) -> None:
    import os

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # gymnasium draws with pygame; no display here
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runner = load_agent("CartPole-v1")
    env = make_env("CartPole-v1", render_mode="rgb_array")
    obs, _ = env.reset(seed=ZERO_SHOT_SEED)
    shots, step, done = [], 0, False
    wanted = set(np.linspace(0, args.steps - 1, args.frames).astype(int).tolist())
    while not done and step <= args.steps:
        if step in wanted:
            shots.append((step, float(obs[2]), env.render()))
        action = runner.model.predict(torch.as_tensor(obs[None]), args.method).output.argmax(-1).item()
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
        step += 1
    env.close()
    fig, axes = plt.subplots(1, len(shots), figsize=(2.2 * len(shots), 1.6))
    for ax, (t, angle, image) in zip(np.atleast_1d(axes), shots, strict=True):
        ax.imshow(image[100:330, 50:550])
        ax.set_title(f"step {t}, θ = {np.degrees(angle):+.1f}°", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"dqn-cartpole, method {args.method}, served weights", fontsize=9)
    fig.tight_layout()
    out = REPO_ROOT / "docs" / "dqn_cartpole_frames.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("zeroshot")
    p.add_argument("--episodes", type=int, default=20)
    p.set_defaults(run=zeroshot)
    for name, run, seeds in (("finetune", finetune, 3), ("scratch", scratch, None)):
        p = commands.add_parser(name)
        p.add_argument("--seeds", type=int, default=seeds, help="default: 3 (scratch: per environment)")
        p.add_argument("--envs", nargs="+", default=list(AGENTS), choices=list(AGENTS))
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(run=run)
        if name == "finetune":
            p.add_argument("--bins", type=int, default=10, help="points per return curve")
    p = commands.add_parser("frames")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--steps", type=int, default=500, help="span of the strip (CartPole-v1 ends at 500)")
    p.add_argument("--method", default="equizero", choices=[m.value for m in Method])
    p.set_defaults(run=frames)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny networks: more threads only contend on a shared machine
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Markdown tables and curves of bench/dqn_asymmetric.py, from its JSON (``python bench/dqn_asymmetric.py report``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import markdown_table
from dqn_asymmetric import SOLVED, Variant, bootstrap_ci, cell, nested_ci, stat
from tables import header

from app.equivariance.methods import Method

TITLES = {"vanilla": "vanilla", "equitune": "equitune", "equizero": "equizero", "lambda": "λ-equitune"}
MAIN = ["vanilla", "equitune", "lambda", "equizero-st", "equizero"]
COLOURS = {  # one colour per variant across the three panels
    "vanilla": "tab:blue", "equitune": "tab:orange", "lambda": "tab:green", "equizero-st": "tab:red",
    "equizero": "tab:purple", "equizero-st-double": "tab:brown", "equizero-vanilla-target": "tab:pink",
    "equizero-equitune-target": "tab:olive", "equizero-double": "tab:cyan",
}  # fmt: skip


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _command(report: dict[str, Any]) -> str:
    return header(report)


def zeroshot_md(results: Path, methods: list[Method]) -> str | None:
    agents, zs = _load(results, "dqn_asym_agents"), _load(results, "dqn_asym_zeroshot")
    if agents is None or zs is None:
        return None
    rows_agents = [[str(a["seed"]), str(a["checkpoint"]), f"{a['selection_return']:.1f}",
                    "yes" if a["in_range"] else "no (nearest to 200)"] for a in agents["agents"]]  # fmt: skip
    rows, per_agent_rows = [], []
    for m in methods:
        groups = [a["methods"][m.value]["returns"] for a in zs["agents"]]
        bias = [a["methods"][m.value]["q_bias"] for a in zs["agents"]]
        solved = [float(np.mean(np.asarray(g) >= SOLVED)) for g in groups]
        q0 = [a["methods"][m.value]["q_start"] for a in zs["agents"]]
        g0 = [a["methods"][m.value]["discounted_return_start"] for a in zs["agents"]]
        rows.append([TITLES[m.value], cell(stat([float(np.mean(g)) for g in groups], groups)),
                     cell(stat([float(np.mean(b)) for b in bias], bias)),
                     cell(stat([float(np.mean(q)) for q in q0], q0)), cell(stat([float(np.mean(g)) for g in g0], g0)),
                     f"{np.mean(solved):.2f}"])  # fmt: skip
        per_agent_rows.append([TITLES[m.value], *[f"{np.mean(g):.1f}" for g in groups]])
    n_agents, episodes = len(zs["agents"]), zs["episodes"]
    return "\n\n".join([
        "# DQN zero-shot from asymmetric CartPole agents (harder starts)",
        _command(agents),
        "The agents: vanilla DQN (the zoo's CartPole hyperparameters) trained on CartPole-v1 from harder starts "
        f"({agents['starts']}); per training seed, the last checkpoint (every 2500 steps up to 30000) whose vanilla "
        f"greedy return over 20 selection episodes was in [{agents['pick_range'][0]:g}, {agents['pick_range'][1]:g}].",
        markdown_table(["agent seed", "checkpoint (steps)", "selection return (20 ep.)", "in range"], rows_agents),
        _command(zs),
        f"Each agent wrapped by each method, {episodes} greedy episodes from the same harder starts (seeds "
        f"2000000..{2000000 + episodes - 1}, disjoint from selection and training), {n_agents} agents. The λ-net is "
        f"trained per agent for {zs['lambda_steps']} environment steps with the Q-network frozen (it starts uniform = "
        "equitune). Mean over agents of the mean return; 95% bootstrap interval resampling agents, then episodes. "
        "Q bias: the Q-value of the action taken minus the discounted return (γ = 0.99) that followed, averaged over "
        "each episode's first 100 steps (positive = overestimation); the same two at the start state alone. "
        "Solved: fraction of episodes at ≥ 475.",
        markdown_table(["method", "greedy return", "Q bias", "Q̂ at the start state", "discounted return from it",
                        "solved"], rows),
        "Per agent (mean return over the episodes):",
        markdown_table(["method", *[f"agent {a['seed']}" for a in zs["agents"]]], per_agent_rows),
    ])  # fmt: skip


def _auc(curve: list[dict[str, float]], steps: int) -> float:
    x = np.array([p["step"] for p in curve], dtype=float)
    y = np.array([p["return"] for p in curve], dtype=float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / steps)


def _steps_to(curve: list[dict[str, float]]) -> int | None:
    return next((int(p["step"]) for p in curve if p["return"] >= SOLVED), None)


def finetune_summary(ft: dict[str, Any], variants: list[Variant]) -> dict[str, dict[str, Any]]:
    out = {}
    for v in variants:
        runs = sorted((r for r in ft["runs"] if r["variant"] == v.name), key=lambda r: r["seed"])
        if not runs:
            continue
        finals = [r["final"]["returns"] for r in runs]
        biases = [r["final"]["q_bias"] for r in runs]
        out[v.name] = {
            "seeds": [r["seed"] for r in runs],
            "final": stat([float(np.mean(f)) for f in finals], finals),
            "auc": stat([_auc(r["curve"], ft["steps"]) for r in runs]),
            "steps_to_solved": [_steps_to(r["curve"]) for r in runs],
            "q_bias_final": stat([float(np.mean(b)) for b in biases], biases),
            "q_bias_curve_mean": stat([float(np.mean([p["q_bias"] for p in r["curve"][1:]])) for r in runs]),
            "start": stat([r["curve"][0]["return"] for r in runs]),
        }
    return out


def finetune_md(results: Path, variants: list[Variant]) -> str | None:
    ft, zs = _load(results, "dqn_asym_finetune"), _load(results, "dqn_asym_zeroshot")
    if ft is None:
        return None
    summary = finetune_summary(ft, variants)
    steps = ft["steps"]
    rows = []
    for v in variants:
        if v.name not in summary:
            continue
        s = summary[v.name]
        reached = [x for x in s["steps_to_solved"] if x is not None]
        median = np.median([x if x is not None else np.inf for x in s["steps_to_solved"]])
        to = f"{median:.0f}" if np.isfinite(median) else f">{steps}"
        per_seed = ", ".join(str(x) if x is not None else f">{steps}" for x in s["steps_to_solved"])
        rows.append([f"`{v.name}`", v.label, str(len(s["seeds"])), cell(s["final"]), cell(s["auc"]),
                     f"{to} ({len(reached)}/{len(s['seeds'])}: {per_seed})", cell(s["q_bias_final"]),
                     cell(s["q_bias_curve_mean"])])  # fmt: skip
    parts = [
        "# DQN fine-tuning from asymmetric CartPole agents (harder starts)",
        _command(ft),
        f"Each variant fine-tunes agent `seed` (see dqn_asym_zeroshot.md) for {steps} environment steps with training "
        "seed `seed` (SB3 DQN, the zoo's CartPole hyperparameters, ε = 0.05 throughout), from the harder starts. "
        f"Greedy evaluation every {ft['eval_every']} steps over {ft['curve_episodes']} episodes (seeds 4000000..) "
        f"gives the curve; after training, {ft['episodes']} greedy episodes (seeds 2000000..). Final return: mean over "
        "seeds, 95% bootstrap interval resampling seeds, then episodes. AUC: area under the greedy-return curve "
        "from step 0 (the pretrained agent) to the end, divided by the steps (= the curve's mean return), 95% "
        "bootstrap over seeds. Steps to 475: first evaluation at or above it, median over seeds (per seed in "
        "brackets; '>' never). Q bias: Q̂ of the taken action minus the discounted return that followed (first 100 "
        "steps of each episode); 'final' on the 100 end episodes, 'during' the mean over the curve's evaluations.",
        markdown_table(
            ["variant", "what", "seeds", "final return", "AUC", "steps to 475", "Q bias final", "Q bias during"], rows
        ),
    ]
    if zs is not None and "vanilla" in summary:
        lam = [a["methods"]["lambda"]["returns"] for a in zs["agents"]]
        van = [a["methods"]["vanilla"]["returns"] for a in zs["agents"]]
        parts += [
            f"Zero-shot λ against vanilla fine-tuning with the same environment steps ({zs['lambda_steps']} for the "
            f"λ-net on the frozen agent, {steps} for the vanilla fine-tuning), same agents, same {ft['episodes']} "
            "evaluation episodes:",
            markdown_table(["", "environment steps", "Q-network changed", "greedy return"], [
                ["pretrained agent, vanilla", "0", "no", cell(stat([float(np.mean(g)) for g in van], van))],
                ["zero-shot λ-equitune (λ-net trained)", str(zs["lambda_steps"]), "no",
                 cell(stat([float(np.mean(g)) for g in lam], lam))],
                ["vanilla fine-tuned", str(steps), "yes", cell(summary["vanilla"]["final"])],
            ]),
        ]  # fmt: skip
    return "\n\n".join(parts)


def shipped_md(results: Path, methods: list[Method]) -> str | None:
    sh = _load(results, "dqn_asym_shipped")
    if sh is None:
        return None
    rows = []
    for name, r in sh["results"].items():
        d = 2 if "grid" in name else 1
        rows.append([f"`{name}`", "gymnasium's"] + [cell(stat(r["methods"][m.value]), d) for m in methods])
        if "hard_starts" in r:
            rows.append([f"`{name}`", "±0.15"] + [cell(stat(r["hard_starts"][m.value]), d) for m in methods])
    return "\n\n".join([
        "# DQN zero-shot: the shipped agents, 100 episodes",
        _command(sh),
        f"Each shipped agent (one pretrained agent per environment) wrapped by each method, {sh['episodes']} greedy "
        "episodes (seeds 2000000..); mean and 95% bootstrap interval over episodes. These are single agents: the "
        "intervals are over episodes, not over training runs.",
        markdown_table(["agent", "starts", *[TITLES[m.value] for m in methods]], rows),
    ])  # fmt: skip


def plot(results: Path, variants: list[Variant]) -> Path | None:
    ft = _load(results, "dqn_asym_finetune")
    if ft is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("methods", MAIN), ("equizero ablations", [v.name for v in variants if v.method is Method.EQUIZERO])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, names) in zip(axes[:2], groups, strict=True):
        for name in names:
            runs = [r for r in ft["runs"] if r["variant"] == name]
            if not runs:
                continue
            x = np.array([p["step"] for p in runs[0]["curve"]])
            y = np.array([[p["return"] for p in r["curve"]] for r in runs if len(r["curve"]) == len(x)])
            lo, hi = np.array([bootstrap_ci(list(col)) for col in y.T]).T
            ax.plot(x, y.mean(0), marker="o", markersize=3, label=name, color=COLOURS[name])
            ax.fill_between(x, lo, hi, alpha=0.08, color=COLOURS[name])
        ax.axhline(SOLVED, color="grey", lw=0.8, ls="--")
        ax.set_title(f"greedy return during fine-tuning: {title}", fontsize=9)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for name in [*MAIN, "equizero-equitune-target", "equizero-double"]:
        runs = [r for r in ft["runs"] if r["variant"] == name]
        if not runs:
            continue
        x = np.array([p["step"] for p in runs[0]["curve"]])
        y = np.array([[p["q_bias"] for p in r["curve"]] for r in runs if len(r["curve"]) == len(x)])
        ax.plot(x, y.mean(0), marker="o", markersize=3, label=name, color=COLOURS[name])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title("Q̂ − discounted return (greedy episodes), mean of the seeds", fontsize=9)
    ax.set_xlabel("environment steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    seeds = len({r["seed"] for r in ft["runs"]})
    title = f"CartPole, harder starts, from asymmetric early checkpoints; mean of {seeds} seeds, 95% bootstrap band"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = results / "dqn_asym_finetune.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reports(results: Path, variants: list[Variant], methods: list[Method]) -> None:
    for name, md in (("dqn_asym_zeroshot", zeroshot_md(results, methods)),
                     ("dqn_asym_finetune", finetune_md(results, variants)),
                     ("dqn_asym_shipped", shipped_md(results, methods))):  # fmt: skip
        if md is not None:
            (results / f"{name}.md").write_text(md + "\n")
            print(f"wrote {results / name}.md", file=sys.stderr)
    path = plot(results, variants)
    if path is not None:
        print(f"wrote {path}", file=sys.stderr)


__all__ = ["finetune_summary", "nested_ci", "write_reports"]

"""DQN on CartPole from good-but-asymmetric pretrained agents: zero-shot, fine-tuning, equizero's ablations.

The shipped CartPole agent already scores the 500-step cap from gymnasium's starts, so no method
can beat it there. Here every run uses harder starts (every coordinate uniform in ±0.15, the
``Starts`` of ``app.tasks.act.envs``), and the pretrained agents are early checkpoints of vanilla
DQN on them: for each of ``--seeds`` training seeds, the LAST checkpoint (every 2.5k steps up to
30k) whose greedy return on selection episodes is in [100, 300]. Chosen by vanilla's return only,
so nothing here is selected for how a symmetrised agent does.

Phases (one command each, each writes its JSON under bench/results/ as it goes, so a partial run
keeps what it finished; ``all`` runs them in order, ``report`` only rewrites the markdown and PNG):

* ``pretrain``: the agents (safetensors in ``--work``, not shipped; seed 0 is shipped by ``export``);
* ``zeroshot``: per agent, a λ-net trained on the frozen agent, then greedy returns of every method
  over ``--episodes`` episodes, and the Q-value each method predicts against the discounted return
  that follows (overestimation);
* ``finetune``: per agent, each variant (methods, and equizero's gradient x TD-target ablations)
  fine-tunes for ``--steps`` steps; greedy evaluations every ``--eval-every`` steps (curves, steps
  to 475, area under the curve), ``--episodes`` greedy episodes at the end;
* ``shipped``: the shipped agents (models/dqn-*) zero-shot from gymnasium's starts, ``--episodes`` each;
* ``export``: models/dqn-cartpole-early from agent seed 0 and its λ-net.

Run from the repository root (one training process at a time; about an hour on 2 shared cores)::

    OMP_NUM_THREADS=1 nice -n 10 python bench/dqn_asymmetric.py all
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `python bench/dqn_asymmetric.py` finds `app` without installing it
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import load_average, report_header, utc_now, write_json  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402

from app.equivariance.methods import Method  # noqa: E402
from app.equivariance.qvalues import QValueModel  # noqa: E402
from app.tasks.act.envs import Starts, make_env, solved_threshold  # noqa: E402
from app.tasks.act.qnet import QNet, equivariant  # noqa: E402
from app.tasks.act.symmetries import symmetry  # noqa: E402
from app.tasks.act.training import DQNConfig, Target, load_qnet, train_dqn  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
MODELS = REPO_ROOT / "models"
ENV = "CartPole-v1"
HARD = Starts(0.15)
SOLVED = solved_threshold(ENV)
GAMMA = 0.99  # the zoo's CartPole γ, which the Q-values estimate
BIAS_HORIZON = 100  # Q̂(s_t) vs the return after t, for t < this: γ^(500-100) makes the 500-step cap negligible
CHECKPOINT_EVERY, PRETRAIN_STEPS, PICK = 2_500, 30_000, (100.0, 300.0)
SELECTION_SEED, EVAL_SEED, CURVE_SEED = 3_000_000, 2_000_000, 4_000_000  # episode seeds no training run saw
METHODS = [Method.VANILLA, Method.EQUITUNE, Method.EQUIZERO, Method.LAMBDA]


@dataclass(frozen=True)
class Variant:
    name: str
    method: Method
    target: Target = Target.SAME
    straight_through: bool = False
    label: str = ""


VARIANTS = [
    Variant("vanilla", Method.VANILLA, label="vanilla"),
    Variant("equitune", Method.EQUITUNE, label="equitune"),
    Variant("lambda", Method.LAMBDA, label="λ-equitune"),
    Variant("equizero-st", Method.EQUIZERO, straight_through=True, label="equizero, old: straight-through, max target"),
    Variant("equizero-st-double", Method.EQUIZERO, Target.DOUBLE, True, "equizero: straight-through, double target"),
    Variant("equizero", Method.EQUIZERO, label="equizero, fixed: selected-copy gradient, max target"),
    Variant("equizero-vanilla-target", Method.EQUIZERO, Target.VANILLA, label="equizero: selected, vanilla target"),
    Variant("equizero-equitune-target", Method.EQUIZERO, Target.EQUITUNE, label="equizero: selected, equitune target"),
    Variant("equizero-double", Method.EQUIZERO, Target.DOUBLE, label="equizero: selected, double target"),
]


# -- measurements ----------------------------------------------------------------------------------
@torch.no_grad()
def rollout(model: QValueModel, method: Method, episodes: int, seed: int, starts: Starts = HARD) -> dict[str, Any]:
    """Greedy episodes side by side: returns, and Q̂(s_t, a_t) - Σ_k γ^k r_{t+k} over t < BIAS_HORIZON."""
    was_training = model.training
    model.eval()
    envs = [make_env(ENV, starts=starts) for _ in range(episodes)]
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    q_taken: list[list[float]] = [[] for _ in range(episodes)]
    rewards: list[list[float]] = [[] for _ in range(episodes)]
    live = list(range(episodes))
    while live:
        q = model.predict(torch.as_tensor(np.stack([obs[i] for i in live]), dtype=torch.float32), method).output
        actions = q.argmax(-1)
        still = []
        for row, i in enumerate(live):
            a = int(actions[row])
            q_taken[i].append(float(q[row, a]))
            obs[i], r, terminated, truncated, _ = envs[i].step(a)
            rewards[i].append(float(r))
            if not (terminated or truncated):
                still.append(i)
        live = still
    for env in envs:
        env.close()
    model.train(was_training)
    bias, q_start, g_start = [], [], []
    for qs, rs in zip(q_taken, rewards, strict=True):
        g, returns = 0.0, np.zeros(len(rs))
        for t in range(len(rs) - 1, -1, -1):
            g = rs[t] + GAMMA * g
            returns[t] = g
        n = min(BIAS_HORIZON, len(rs))
        bias.append(float(np.mean(np.asarray(qs[:n]) - returns[:n])))
        q_start.append(qs[0])
        g_start.append(float(returns[0]))
    return {
        "returns": [float(sum(rs)) for rs in rewards],
        "q_bias": bias,  # per episode: mean over its first BIAS_HORIZON steps
        "q_start": q_start,
        "discounted_return_start": g_start,
    }


def bootstrap_ci(values: list[float], reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (reps, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def nested_ci(groups: list[list[float]], reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the grand mean, resampling agents, then episodes within each."""
    data = [np.asarray(g, dtype=float) for g in groups]
    rng = np.random.default_rng(seed)
    means = np.empty(reps)
    for r in range(reps):
        picks = rng.integers(0, len(data), len(data))
        means[r] = np.mean([data[p][rng.integers(0, len(data[p]), len(data[p]))].mean() for p in picks])
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def stat(values: list[float], groups: list[list[float]] | None = None) -> dict[str, Any]:
    lo, hi = nested_ci(groups) if groups is not None else bootstrap_ci(values)
    return {"mean": round(float(np.mean(values)), 2), "ci95": [round(lo, 2), round(hi, 2)], "n": len(values)}


def cell(s: dict[str, Any], d: int = 1) -> str:
    return f"{s['mean']:.{d}f} [{s['ci95'][0]:.{d}f}, {s['ci95'][1]:.{d}f}]"


def model_of(qnet: QNet, lambda_state: dict[str, torch.Tensor] | None = None) -> QValueModel:
    from app.equivariance.lambda_net import LambdaNet

    lambda_net = None
    if lambda_state is not None:
        lambda_net = LambdaNet(qnet.feature_dim)
        lambda_net.load_state_dict(lambda_state)
    return equivariant(qnet, symmetry(ENV).group(), lambda_net)


def machine_report(name: str, started: Any, note: str, load: Any, **extra: Any) -> dict[str, Any]:
    return {**report_header(name, started, note, load), **extra}


def read(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# -- phases ----------------------------------------------------------------------------------------
def pretrain(args: argparse.Namespace) -> None:
    started, load = utc_now(), load_average()
    args.work.mkdir(parents=True, exist_ok=True)
    agents = []
    for seed in range(args.seeds):
        steps = tuple(range(CHECKPOINT_EVERY, PRETRAIN_STEPS + 1, CHECKPOINT_EVERY))
        t = time.perf_counter()
        result = train_dqn(
            DQNConfig(ENV, steps=PRETRAIN_STEPS, seed=seed, starts=HARD, checkpoints=steps), progress_bar=False
        )
        scores = {}
        for step, state in result.checkpoints.items():
            qnet = QNet(4, 2)
            qnet.load_state_dict(state)
            scores[step] = float(np.mean(rollout(model_of(qnet), Method.VANILLA, 20, SELECTION_SEED)["returns"]))
        inside = [s for s, v in scores.items() if PICK[0] <= v <= PICK[1]]
        pick = inside[-1] if inside else min(scores, key=lambda s: abs(scores[s] - 200.0))
        qnet = QNet(4, 2)
        qnet.load_state_dict(result.checkpoints[pick])
        qnet.save(args.work / f"agent{seed}.safetensors")
        agents.append(
            {
                "seed": seed,
                "checkpoint": pick,
                "selection_return": scores[pick],
                "in_range": bool(inside),
                "checkpoint_returns": scores,
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        print(f"agent {seed}: checkpoint {pick} ({scores[pick]:.1f}); {scores}", file=sys.stderr, flush=True)
    write_json(
        RESULTS / "dqn_asym_agents.json",
        machine_report(
            "dqn_asym_agents",
            started,
            "early vanilla checkpoints on hard CartPole starts",
            load,
            starts=HARD.describe(),
            pick_range=PICK,
            agents=agents,
        ),
    )


def zeroshot(args: argparse.Namespace) -> None:
    started, load = utc_now(), load_average()
    per_agent = []
    for seed in range(args.seeds):
        path = args.work / f"agent{seed}.safetensors"
        t = time.perf_counter()
        lam = train_dqn(
            DQNConfig(ENV, Method.LAMBDA, steps=args.lambda_steps, seed=seed, init=path, freeze_q=True, starts=HARD),
            progress_bar=False,
        )
        lambda_state = {k: v.detach().clone() for k, v in lam.model.lambda_net.state_dict().items()}
        torch.save(lambda_state, args.work / f"lambda{seed}.pt")
        model = model_of(load_qnet(path, ENV), lambda_state)
        row = {"seed": seed, "lambda_seconds": round(time.perf_counter() - t, 1), "methods": {}}
        for method in METHODS:
            row["methods"][method.value] = rollout(model, method, args.episodes, EVAL_SEED)
        per_agent.append(row)
        print(
            f"agent {seed}: "
            + ", ".join(
                f"{m}: {np.mean(r['returns']):.1f} (bias {np.mean(r['q_bias']):+.1f})"
                for m, r in row["methods"].items()
            ),
            file=sys.stderr,
            flush=True,
        )
        write_json(
            RESULTS / "dqn_asym_zeroshot.json",
            machine_report(
                "dqn_asym_zeroshot",
                started,
                "zero-shot from the early checkpoints",
                load,
                episodes=args.episodes,
                lambda_steps=args.lambda_steps,
                agents=per_agent,
            ),
        )


class _Curve(BaseCallback):
    """Greedy evaluations (return and Q bias) every ``every`` steps, and one before the first step."""

    def __init__(self, method: Method, every: int, episodes: int) -> None:
        super().__init__()
        self.method, self.every, self.episodes = method, every, episodes
        self.points: list[dict[str, float]] = []

    def _measure(self) -> None:
        out = rollout(self.model.policy.q_net.model, self.method, self.episodes, CURVE_SEED)  # type: ignore[union-attr]
        self.points.append(
            {
                "step": self.num_timesteps,
                "return": float(np.mean(out["returns"])),
                "q_bias": float(np.mean(out["q_bias"])),
            }
        )

    def _on_training_start(self) -> None:
        self._measure()

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every == 0:
            self._measure()
        return True


def finetune(args: argparse.Namespace) -> None:
    started, load = utc_now(), load_average()
    previous = read("dqn_asym_finetune").get("runs", []) if args.resume else []
    done = {(r["variant"], r["seed"]) for r in previous}
    runs = list(previous)
    variants = [v for v in VARIANTS if not args.variants or v.name in args.variants]
    for seed in range(args.seeds):  # seed-major: a cut-off run still has every variant on the first seeds
        for variant in variants:
            if (variant.name, seed) in done:
                continue
            config = DQNConfig(
                ENV,
                variant.method,
                steps=args.steps,
                seed=seed,
                init=args.work / f"agent{seed}.safetensors",
                starts=HARD,
                target=variant.target,
                equizero_straight_through=variant.straight_through,
            )
            curve = _Curve(variant.method, args.eval_every, args.curve_episodes)
            t = time.perf_counter()
            result = train_dqn(config, progress_bar=False, callback=curve)
            final = rollout(result.model, variant.method, args.episodes, EVAL_SEED)
            runs.append(
                {
                    "variant": variant.name,
                    "seed": seed,
                    "curve": curve.points,
                    "final": final,
                    "episodes": result.episodes,
                    "seconds": round(time.perf_counter() - t, 1),
                }
            )
            print(
                f"seed {seed} {variant.name}: final {np.mean(final['returns']):.1f}"
                f" bias {np.mean(final['q_bias']):+.1f}"
                f" curve {[round(p['return']) for p in curve.points]} ({time.perf_counter() - t:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            write_json(
                RESULTS / "dqn_asym_finetune.json",
                machine_report(
                    "dqn_asym_finetune",
                    started,
                    "fine-tuning from the early checkpoints",
                    load,
                    steps=args.steps,
                    eval_every=args.eval_every,
                    curve_episodes=args.curve_episodes,
                    episodes=args.episodes,
                    runs=runs,
                ),
            )


def shipped(args: argparse.Namespace) -> None:
    import yaml

    from app.tasks.act.model import ActModel
    from app.tasks.act.spec import ActSpec
    from app.tasks.act.training import evaluate
    from app.tasks.base import LoadOptions

    started, load = utc_now(), load_average()
    out: dict[str, Any] = {}
    for name, env_id in (
        ("dqn-cartpole", ENV),
        ("dqn-acrobot", "Acrobot-v1"),
        ("dqn-grid", "equiserve/GridWorldC4-v0"),
    ):
        folder = MODELS / name
        spec = ActSpec.model_validate({**yaml.safe_load((folder / "model.yaml").read_text()), "name": name})
        runner = ActModel.load(folder, spec, LoadOptions(device="cpu"))
        out[name] = {"env": env_id, "methods": {}}
        for method in METHODS:
            returns = evaluate(runner.model, env_id, method, args.episodes, seed=EVAL_SEED)
            out[name]["methods"][method.value] = returns
            if env_id == ENV:  # the harder starts too: where the shipped CartPole agent is not at the cap
                returns = evaluate(runner.model, env_id, method, args.episodes, seed=EVAL_SEED, starts=HARD)
                out[name].setdefault("hard_starts", {})[method.value] = returns
        print(name, {m: round(float(np.mean(r)), 2) for m, r in out[name]["methods"].items()}, file=sys.stderr)
    write_json(
        RESULTS / "dqn_asym_shipped.json",
        machine_report(
            "dqn_asym_shipped", started, "the shipped agents zero-shot", load, episodes=args.episodes, results=out
        ),
    )


def export(args: argparse.Namespace) -> None:
    """models/dqn-cartpole-early: agent 0 (its λ-net as the default method), its card says what it is."""
    from safetensors.torch import save_file

    agents = read("dqn_asym_agents")["agents"]
    zs = read("dqn_asym_zeroshot")["agents"][0]
    a0 = agents[0]
    folder = MODELS / "dqn-cartpole-early"
    folder.mkdir(parents=True, exist_ok=True)
    load_qnet(args.work / "agent0.safetensors", ENV).save(folder / "qnet.safetensors")
    save_file(
        {k: v.contiguous() for k, v in torch.load(args.work / "lambda0.pt").items()},
        str(folder / "lambda_net.safetensors"),
    )
    import yaml

    from app.tasks.act.training import HYPERPARAMETERS

    def summary(returns: list[float]) -> dict[str, float]:
        return {"mean": round(float(np.mean(returns)), 1), "std": round(float(np.std(returns)), 1)}

    spec = {
        "task": "act",
        "description": (
            f"ASYMMETRIC on purpose: an early checkpoint of vanilla DQN on CartPole-v1 ({a0['checkpoint']} of "
            f"{PRETRAIN_STEPS} steps, seed 0, from harder starts: {HARD.describe()}), good but not solved and not "
            "equivariant; wrapped by equitune, equizero or its λ-net it scores higher from those starts "
            "(training.greedy_return_hard_starts, docs/dqn.md). dqn-cartpole is the finished agent."
        ),
        "env": ENV,
        "group": symmetry(ENV).group_name,
        "backbone": {"family": "mlp", "options": {"hidden": [256, 256]}},
        "weights": "qnet.safetensors",
        "methods": [m.value for m in Method],
        "default_method": Method.LAMBDA.value,
        "lambda_net": "lambda_net.safetensors",
        "training": {
            "library": "stable-baselines3 DQN",
            "method": "vanilla",
            "steps": a0["checkpoint"],
            "of_a_run_of": PRETRAIN_STEPS,
            "seed": 0,
            "starts": HARD.describe(),
            "checkpoint_choice": f"the last checkpoint (every {CHECKPOINT_EVERY} steps) whose vanilla greedy "
            f"return over 20 selection episodes was in [{PICK[0]:g}, {PICK[1]:g}]",
            "hyperparameters": HYPERPARAMETERS[ENV],
            "greedy_return_hard_starts": {
                "episodes": len(zs["methods"]["vanilla"]["returns"]),
                **{m: summary(zs["methods"][m]["returns"]) for m in zs["methods"]},
            },
            "lambda_net": {
                "method": "lambda",
                "freeze_q": True,
                "steps": read("dqn_asym_zeroshot")["lambda_steps"],
                "seed": 0,
                "starts": HARD.describe(),
            },
            "made_by": "bench/dqn_asymmetric.py pretrain, zeroshot, export",
        },
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    for path in folder.iterdir():  # safetensors writes 0600; the container's server runs as another user
        path.chmod(0o644)
    print(f"wrote {folder}", file=sys.stderr)


def run_all(args: argparse.Namespace) -> None:
    for phase in (pretrain, zeroshot, shipped, finetune):
        phase(args)
    export(args)
    report(args)


def report(args: argparse.Namespace) -> None:
    from dqn_asymmetric_report import write_reports

    write_reports(RESULTS, VARIANTS, METHODS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / ".cache" / "dqn_asymmetric", help="agents' weights")
    parser.add_argument("--seeds", type=int, default=5, help="pretrained agents = fine-tuning seeds")
    parser.add_argument("--episodes", type=int, default=100, help="greedy episodes of a final evaluation")
    parser.add_argument("--lambda-steps", type=int, default=10_000, help="λ-net training on the frozen agent")
    parser.add_argument("--steps", type=int, default=10_000, help="fine-tuning steps (the λ-net's, for the comparison)")
    parser.add_argument("--eval-every", type=int, default=1_000)
    parser.add_argument("--curve-episodes", type=int, default=20)
    parser.add_argument("--variants", nargs="*", default=None, choices=[v.name for v in VARIANTS])
    parser.add_argument("--resume", action="store_true", help="finetune: keep the runs already in the JSON")
    commands = {
        "pretrain": pretrain,
        "zeroshot": zeroshot,
        "finetune": finetune,
        "shipped": shipped,
        "export": export,
        "report": report,
        "all": run_all,
    }
    parser.add_argument("command", choices=list(commands))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny networks: more threads only contend on a shared machine
    commands[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

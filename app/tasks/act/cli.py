"""``python -m app train-dqn`` and ``python -m app play`` (meanwhile ``python -m app.tasks.act.cli ...``).

* ``train-dqn``: train (or fine-tune, ``--init``) a DQN agent with a method on stable-baselines3's loop
  and write ``models/<name>/`` (model.yaml + qnet.safetensors [+ lambda_net.safetensors]);
* ``play``: drive gymnasium episodes through a server's ``POST /v1/models/{model}/act`` and print
  the returns. All episodes run side by side: each step sends every unfinished episode's state
  in ONE request, so the server combines all their copies in one fused pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.command_line import add_models_dir, configure_logging, require_extra
from app.equivariance import METHOD_NAMES, Method

if TYPE_CHECKING:
    from .training import DQNConfig


def add_parsers(commands: Any) -> None:
    add_train_dqn_parser(commands)
    add_play_parser(commands)


def add_train_dqn_parser(commands: Any) -> None:
    p = commands.add_parser(
        "train-dqn",
        help="train a DQN agent (stable-baselines3) and write models/<name>",
        description="Train a DQN agent with a method (vanilla = no symmetry) and write models/<name>/ that "
        "`serve` loads as an act model.",
    )
    p.add_argument("--env", default="CartPole-v1", help="CartPole-v1, Acrobot-v1 or equiserve/GridWorldC4-v0")
    p.add_argument("--method", default="vanilla", choices=METHOD_NAMES, help="how the copies are combined in training")
    p.add_argument("--steps", type=int, default=None, help="environment steps (default: per environment)")
    p.add_argument("--seed", type=int, default=0, help="seeds the network, the exploration and the evaluation")
    p.add_argument("--init", type=Path, default=None, help="start from this agent (model folder or safetensors)")
    p.add_argument("--freeze-q", action="store_true", help="with --method lambda --init: train the λ-net only")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256], help="hidden layer widths")
    p.add_argument("--eval-episodes", type=int, default=20, help="greedy episodes scored after training")
    p.add_argument("--name", required=True, help="model folder name under --models-dir")
    p.add_argument("--description", default=None, help="the entry's description in model.yaml")
    p.add_argument(
        "--default-method",
        default=None,
        choices=METHOD_NAMES,
        help="the entry's (default: lambda with a λ-net, else equitune)",
    )
    add_models_dir(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train_dqn)


def run_train_dqn(args: argparse.Namespace) -> int:
    require_extra("rl", "train-dqn", "stable_baselines3")
    import torch

    from .training import DQNConfig, evaluate, export_agent, train_dqn

    configure_logging()
    torch.set_num_threads(1)  # tiny networks: more threads only contend on a shared machine
    config = DQNConfig(
        args.env, Method(args.method), args.steps, args.seed, args.init, args.freeze_q, tuple(args.hidden)
    )
    result = train_dqn(config, progress_bar=not args.quiet)
    returns = evaluate(result.model, args.env, config.method, args.eval_episodes, seed=1_000_000 + args.seed)
    description = args.description or _description(config)
    folder = export_agent(
        args.models_dir / args.name,
        result,
        config,
        description=description,
        eval_returns=returns,
        default_method=Method(args.default_method or ("lambda" if config.method is Method.LAMBDA else "equitune")),
    )
    print(
        json.dumps(
            {
                "model": str(folder),
                "steps": config.total_steps,
                "seconds": round(result.seconds, 1),
                "greedy_return_mean": float(np.mean(returns)),
                "greedy_return_std": float(np.std(returns)),
                "episodes": len(returns),
            }
        )
    )
    return 0


def _description(config: DQNConfig) -> str:
    run = f"{config.total_steps} steps, seed {config.seed}"
    if config.freeze_q and (config.init / "model.yaml").is_file():
        import yaml

        agent = yaml.safe_load((config.init / "model.yaml").read_text()).get("description", "")
        agent = agent.split("; λ-net trained")[0]  # a λ-net trained again replaces the last one
        return f"{agent}; λ-net trained on it with the Q-network frozen ({run})"
    trained = "fine-tuned" if config.init else "trained"
    return f"DQN agent for {config.env_id}, {trained} with method {config.method.value} ({run})"


def add_play_parser(commands: Any) -> None:
    p = commands.add_parser(
        "play",
        help="play gymnasium episodes through a server's act endpoint and print the returns",
        description="Drive gymnasium episodes with the actions of POST {url}/v1/models/{model}/act.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--model", required=True, help="an act model it serves, e.g. dqn-cartpole")
    p.add_argument("--env", default="CartPole-v1", help="gymnasium id (must match the model's)")
    p.add_argument("--episodes", type=int, default=10, help="episodes to play")
    p.add_argument("--seed", type=int, default=0, help="episode i is reset with seed + i")
    p.add_argument("--method", default=None, choices=METHOD_NAMES, help="default: the model's default method")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer <key>'")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.set_defaults(run=run_play)


def run_play(args: argparse.Namespace, transport: Any = None) -> int:
    """``transport``: an httpx transport (tests pass an ASGI app's); None = the network."""
    import httpx

    from app.tasks.act.envs import run_episodes

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    endpoint = f"{args.url.rstrip('/')}/v1/models/{args.model}/act"
    with httpx.Client(transport=transport, headers=headers, timeout=args.timeout) as client:

        def policy(observations: np.ndarray) -> np.ndarray:
            body: dict[str, Any] = {"observations": observations.astype(float).tolist()}
            if args.method is not None:
                body["method"] = args.method
            response = client.post(endpoint, json=body)
            if response.status_code != 200:
                raise PlayError(f"{endpoint} answered {response.status_code}: {response.text[:500]}")
            return np.array([r["action"] for r in response.json()["results"]], dtype=np.int64)

        try:
            returns = run_episodes(policy, args.env, args.episodes, args.seed)
        except (PlayError, httpx.HTTPError) as exc:
            print(f"play: {exc}", file=sys.stderr)
            return 1
    for i, value in enumerate(returns):
        print(f"episode {i} (seed {args.seed + i}): return {value:g}")
    print(f"{args.model} on {args.env}: mean return {np.mean(returns):.2f} ± {np.std(returns):.2f} over {len(returns)}")
    return 0


class PlayError(RuntimeError):
    """The server refused a request."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.tasks.act.cli")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Deep Q-learning with group-combined Q-networks, on stable-baselines3's DQN loop.

SB3 hosts the equivariant network unchanged: its DQN only ever calls ``q_net(obs) -> [B, A]``
(rollouts, the TD target from ``q_net_target``, the loss on the taken actions), so
``GroupQNetwork`` returns the combined ``Q_G(s, ·)`` of a method there. Equizero's TD gradient
reaches the copy it selected (``equizero_straight_through`` restores the old straight-through
estimator: forward the selected copy, gradient equitune's). ``vanilla`` runs the plain network
(no copies), which is how the shipped agents were trained: normally, with no symmetry.

``GroupDQN`` is SB3's DQN with one change, the TD target (``Target``): by default the target
network combines its copies with the run's method, which for equizero is a max over copies on
top of DQN's max over actions; the ablations use the identity copy, the mean of the copies, or a
double-DQN target whose copy weights and action the online network chooses.

The λ-net of a ``lambda`` run starts uniform (its last layer zeroed, the rest at PyTorch's init),
so λ-equitune starts as equitune and learns from the TD loss; ``freeze_q`` trains the λ-net alone.
"""

from __future__ import annotations

import enum
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from gymnasium import spaces
from safetensors.torch import load_file, save_file
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import HumanOutputFormat, Logger
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.dqn.policies import DQNPolicy, QNetwork
from torch import Tensor, nn

from app.equivariance import Method
from app.equivariance.lambda_net import LambdaNet
from app.equivariance.qvalues import QValueModel
from app.tasks.act.envs import Starts, make_env, run_episodes, solved_threshold
from app.tasks.act.qnet import DEFAULT_HIDDEN, QNet, equivariant, greedy_actions
from app.tasks.act.symmetries import symmetry

# SB3 DQN hyperparameters. CartPole and Acrobot: rl-baselines3-zoo's tuned values; the grid: ours.
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(
        learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000, gamma=0.99,
        target_update_interval=10, train_freq=256, gradient_steps=128, exploration_fraction=0.16,
        exploration_final_eps=0.04,
    ),
    "Acrobot-v1": dict(
        learning_rate=6.3e-4, batch_size=128, buffer_size=50_000, learning_starts=0, gamma=0.99,
        target_update_interval=250, train_freq=4, gradient_steps=-1, exploration_fraction=0.12,
        exploration_final_eps=0.1,
    ),
    "equiserve/GridWorldC4-v0": dict(
        learning_rate=1e-3, batch_size=64, buffer_size=50_000, learning_starts=1000, gamma=0.95,
        target_update_interval=500, train_freq=4, gradient_steps=1, exploration_fraction=0.3,
        exploration_final_eps=0.05,
    ),
}  # fmt: skip
DEFAULT_STEPS = {"CartPole-v1": 50_000, "Acrobot-v1": 100_000, "equiserve/GridWorldC4-v0": 60_000}
FINE_TUNE_EPS = 0.05  # fine-tuning a trained agent explores at this constant rate, not from 1.0


def uniform_start_lambda_net(feature_dim: int) -> LambdaNet:
    """A trainable λ-net giving every copy the same weight at first (last layer zero)."""
    net = LambdaNet(feature_dim)
    with torch.no_grad():
        net.mlp[-1].weight.zero_()
        net.mlp[-1].bias.zero_()
    return net


class Target(str, enum.Enum):
    """How the TD target ``r + γ · V(s')`` values the next state (``q_t``: the target network)."""

    SAME = "same"  # max_a of q_t combined with the run's method (SB3's target, our network)
    VANILLA = "vanilla"  # max_a of q_t's identity copy: the plain network's target
    EQUITUNE = "equitune"  # max_a of the mean of q_t's copies
    DOUBLE = "double"  # the online network's copy weights w and action a* (its argmax); Σ_g w_g q_t[g, a*]


class GroupQNetwork(QNetwork):
    """SB3's ``QNetwork`` whose forward is the group-combined Q-values of ``method``."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Discrete,
        features_extractor: nn.Module,
        features_dim: int,
        net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = True,
        *,
        env_id: str,
        method: Method,
        equizero_straight_through: bool = False,
    ) -> None:
        super().__init__(
            observation_space, action_space, features_extractor, features_dim, net_arch, activation_fn, normalize_images
        )
        self.method = method
        self.qnet = QNet(features_dim, int(action_space.n), self.net_arch)
        lambda_net = uniform_start_lambda_net(self.qnet.feature_dim) if method is Method.LAMBDA else None
        # Replaces SB3's MLP; shares the QNet's layers (parameters() lists each once).
        self.q_net = equivariant(self.qnet, symmetry(env_id).group(), lambda_net)
        self.model.equizero_straight_through = equizero_straight_through

    @property
    def model(self) -> QValueModel:
        return self.q_net  # type: ignore[return-value]

    def forward(self, obs: Tensor) -> Tensor:
        obs = self.extract_features(obs, self.features_extractor)
        if self.method is Method.VANILLA:
            return self.qnet(obs)  # copy 0 alone is the identity copy: the plain network
        return self.model.predict(obs, self.method).output


class GroupDQNPolicy(DQNPolicy):
    """``DQNPolicy`` building ``GroupQNetwork``s (the online and the target network)."""

    q_net: GroupQNetwork
    q_net_target: GroupQNetwork

    def __init__(
        self,
        *args: Any,
        env_id: str,
        method: Method | str = Method.VANILLA,
        equizero_straight_through: bool = False,
        **kwargs: Any,
    ) -> None:
        # read by make_q_net during DQNPolicy.__init__
        self.env_id, self.method, self.equizero_straight_through = env_id, Method(method), equizero_straight_through
        super().__init__(*args, **kwargs)

    def make_q_net(self) -> GroupQNetwork:
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        return GroupQNetwork(
            **net_args, env_id=self.env_id, method=self.method, equizero_straight_through=self.equizero_straight_through
        ).to(self.device)


def next_state_values(policy: GroupDQNPolicy, next_obs: Tensor, target: Target) -> Tensor:
    """``V(s')`` ``[B]`` of the TD target (no gradient)."""
    with torch.no_grad():
        target_net = policy.q_net_target
        if target is Target.SAME:
            return target_net(next_obs).max(dim=1).values
        obs = target_net.extract_features(next_obs, target_net.features_extractor)
        if target is Target.VANILLA:
            return target_net.qnet(obs).max(dim=1).values
        if target is Target.EQUITUNE:
            return target_net.model.predict(obs, Method.EQUITUNE).output.max(dim=1).values
        online = policy.q_net.model
        chosen = online.combine(online.copies(obs), policy.method)  # weights [|G|, B]: no gradient flows
        action = chosen.output.argmax(dim=1)  # [B]
        aligned = target_net.model.copies(obs).aligned  # [|G|, B, A]
        index = action.view(1, -1, 1).expand(aligned.shape[0], -1, 1)
        return (chosen.weights * aligned.gather(2, index).squeeze(2)).sum(0)


class GroupDQN(DQN):
    """SB3's ``DQN`` whose TD target is ``next_state_values(..., target)``; the rest is SB3's ``train``."""

    policy: GroupDQNPolicy

    def __init__(self, *args: Any, target: Target = Target.SAME, **kwargs: Any) -> None:
        self.target = Target(target)
        super().__init__(*args, **kwargs)

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        if self.target is Target.SAME:
            return super().train(gradient_steps, batch_size)  # SB3's own code path, unchanged
        # SB3 2.x DQN.train with the TD target replaced (its comments removed)
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        losses = []
        for _ in range(gradient_steps):
            replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            discounts = replay_data.discounts if replay_data.discounts is not None else self.gamma
            next_q_values = next_state_values(self.policy, replay_data.next_observations, self.target).reshape(-1, 1)
            target_q_values = replay_data.rewards + (1 - replay_data.dones) * discounts * next_q_values
            current_q_values = torch.gather(self.q_net(replay_data.observations), dim=1,
                                            index=replay_data.actions.long())  # fmt: skip
            loss = F.smooth_l1_loss(current_q_values, target_q_values)
            losses.append(loss.item())
            self.policy.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()
        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", np.mean(losses))
        return None


@dataclass
class DQNConfig:
    env_id: str
    method: Method = Method.VANILLA
    steps: int | None = None  # None: DEFAULT_STEPS[env_id]
    seed: int = 0
    init: Path | None = None  # a model folder or qnet.safetensors to start from (fine-tuning)
    freeze_q: bool = False  # train the λ-net only
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    overrides: dict[str, Any] = field(default_factory=dict)  # SB3 DQN keyword arguments
    eval_every: int | None = None  # greedy evaluation every this many steps (None: none during training)
    eval_episodes: int = 5
    stop_when_solved: bool = False  # stop at the first evaluation at or above the solved threshold
    starts: Starts | None = None  # CartPole start distribution of training and evaluation (None: gymnasium's)
    target: Target = Target.SAME
    equizero_straight_through: bool = False  # the old estimator (an ablation)
    checkpoints: tuple[int, ...] = ()  # keep a copy of the Q-network's weights at these steps

    def __post_init__(self) -> None:
        self.method = Method(self.method)
        self.target = Target(self.target)
        symmetry(self.env_id)
        if self.freeze_q and (self.init is None or self.method is not Method.LAMBDA):
            raise ValueError("freeze_q trains a λ-net on a pretrained agent: it needs init and method lambda")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.env_id]

    def dqn_kwargs(self) -> dict[str, Any]:
        kwargs = dict(HYPERPARAMETERS[self.env_id])
        if self.init is not None:  # a trained agent: explore a little, from the first step
            kwargs.update(exploration_initial_eps=FINE_TUNE_EPS, exploration_final_eps=FINE_TUNE_EPS)
        kwargs.update(self.overrides)
        return kwargs


@dataclass
class TrainResult:
    agent: DQN
    episodes: list[tuple[int, float]]  # (environment step at the episode's end, its return)
    evaluations: list[tuple[int, float, float]]  # (step, mean, std) of the greedy evaluations
    solved_at: int | None  # first evaluation step at or above the solved threshold
    seconds: float
    checkpoints: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # step -> QNet state dict

    @property
    def model(self) -> QValueModel:
        return self.agent.policy.q_net.model

    @property
    def qnet(self) -> QNet:
        return self.agent.policy.q_net.qnet


def load_qnet(path: Path, env_id: str, hidden: tuple[int, ...] = DEFAULT_HIDDEN) -> QNet:
    """A QNet from ``path`` (a safetensors file, or a model folder with ``qnet.safetensors``)."""
    path = path / "qnet.safetensors" if path.is_dir() else path
    sym = symmetry(env_id)
    qnet = QNet(sym.obs_dim, sym.n_actions, hidden)
    qnet.load_state_dict(load_file(str(path)))
    return qnet


class _Recorder(BaseCallback):
    """Training-episode returns, periodic greedy evaluations, early stop when solved."""

    def __init__(self, config: DQNConfig, threshold: float) -> None:
        super().__init__()
        self.config, self.threshold = config, threshold
        self.episodes: list[tuple[int, float]] = []
        self.evaluations: list[tuple[int, float, float]] = []
        self.solved_at: int | None = None
        self.checkpoints: dict[int, dict[str, Tensor]] = {}

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", []):
            if "episode" in info:
                self.episodes.append((self.num_timesteps, float(info["episode"]["r"])))
        if self.num_timesteps in self.config.checkpoints:
            qnet = self.model.policy.q_net.qnet  # type: ignore[union-attr]
            self.checkpoints[self.num_timesteps] = {k: v.detach().clone() for k, v in qnet.state_dict().items()}
        every = self.config.eval_every
        if every and self.num_timesteps % every == 0:
            policy: GroupDQNPolicy = self.model.policy  # type: ignore[assignment]
            returns = evaluate(policy.q_net.model, self.config.env_id, policy.method, self.config.eval_episodes,
                               seed=10_000 + self.config.seed, starts=self.config.starts)  # fmt: skip
            self.evaluations.append((self.num_timesteps, float(np.mean(returns)), float(np.std(returns))))
            if self.solved_at is None and np.mean(returns) >= self.threshold:
                self.solved_at = self.num_timesteps
                return not self.config.stop_when_solved
        return True


def train_dqn(
    config: DQNConfig, *, progress_bar: bool = True, verbose: int = 0, callback: BaseCallback | None = None
) -> TrainResult:
    """Train (or fine-tune) a DQN agent with ``config.method`` on SB3's loop."""
    torch.manual_seed(config.seed)
    env = Monitor(make_env(config.env_id, starts=config.starts))
    agent = GroupDQN(
        GroupDQNPolicy,
        env,
        target=config.target,
        policy_kwargs=dict(
            env_id=config.env_id,
            method=config.method,
            net_arch=list(config.hidden),
            equizero_straight_through=config.equizero_straight_through,
        ),
        seed=config.seed,
        verbose=verbose,
        device="cpu",
        **config.dqn_kwargs(),
    )
    # SB3's default logger makes an empty SB3-<time> folder in the temp dir on every learn();
    # ours writes to stdout when verbose and nowhere else.
    agent.set_logger(Logger(folder=None, output_formats=[HumanOutputFormat(sys.stdout)] if verbose else []))
    if config.init is not None:
        pretrained = load_qnet(config.init, config.env_id, config.hidden).state_dict()
        for net in (agent.policy.q_net, agent.policy.q_net_target):
            net.qnet.load_state_dict(pretrained)
    if config.freeze_q:
        for p in agent.policy.q_net.qnet.parameters():
            p.requires_grad_(False)
    recorder = _Recorder(config, solved_threshold(config.env_id))
    started = time.perf_counter()
    callbacks = CallbackList([recorder, callback]) if callback is not None else recorder
    agent.learn(config.total_steps, callback=callbacks, progress_bar=progress_bar)
    agent.policy.set_training_mode(False)
    return TrainResult(agent, recorder.episodes, recorder.evaluations, recorder.solved_at,
                       time.perf_counter() - started, recorder.checkpoints)  # fmt: skip


def evaluate(
    model: QValueModel, env_id: str, method: Method | str, episodes: int, seed: int, starts: Starts | None = None
) -> list[float]:
    """Greedy returns of ``model`` combined with ``method`` over seeded episodes."""
    was_training = model.training
    model.eval()
    try:
        return run_episodes(
            lambda obs: (
                greedy_actions(model, torch.as_tensor(obs, dtype=torch.float32), str(Method(method).value))
                .cpu()
                .numpy()
            ),
            env_id,
            episodes,
            seed,
            starts,
        )
    finally:
        model.train(was_training)


def export_agent(
    folder: Path,
    result: TrainResult,
    config: DQNConfig,
    *,
    description: str,
    eval_returns: list[float] | None = None,
    default_method: Method = Method.EQUITUNE,
) -> Path:
    """Write ``folder/model.yaml`` + ``qnet.safetensors`` (+ ``lambda_net.safetensors`` of a lambda run)."""
    folder.mkdir(parents=True, exist_ok=True)
    result.qnet.save(folder / "qnet.safetensors")
    lambda_file = None
    if config.method is Method.LAMBDA and result.model.lambda_net is not None:
        lambda_file = "lambda_net.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in result.model.lambda_net.state_dict().items()}
        save_file(state, str(folder / lambda_file))
    training = {
        "library": "stable-baselines3 DQN",
        "method": config.method.value,
        "steps": config.total_steps,
        "seed": config.seed,
        "init": str(config.init) if config.init is not None else None,
        "freeze_q": config.freeze_q,
        **({"starts": config.starts.describe()} if config.starts is not None and not config.starts.default else {}),
        **({"target": config.target.value} if config.target is not Target.SAME else {}),
        "hyperparameters": config.dqn_kwargs(),
        "seconds": round(result.seconds, 1),
    }
    if eval_returns is not None:
        training["greedy_return"] = {
            "episodes": len(eval_returns),
            "mean": round(float(np.mean(eval_returns)), 3),
            "std": round(float(np.std(eval_returns)), 3),
        }
    if config.freeze_q and config.init is not None and (config.init / "model.yaml").is_file():
        # Only the λ-net was trained: keep the record of how the Q-network was.
        previous = yaml.safe_load((config.init / "model.yaml").read_text()).get("training", {})
        training = {**{k: v for k, v in previous.items() if k != "lambda_net"}, "lambda_net": training}
    spec = {
        "task": "act",
        "description": description,
        "env": config.env_id,
        "group": symmetry(config.env_id).group_name,
        "backbone": {"family": "mlp", "options": {"hidden": list(config.hidden)}},
        "weights": "qnet.safetensors",
        "methods": [m.value for m in Method],
        "default_method": default_method.value,
        **({"lambda_net": lambda_file} if lambda_file else {}),
        "training": training,
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return folder

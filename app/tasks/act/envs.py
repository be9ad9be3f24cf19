"""The environments (gymnasium, offline): CartPole-v1, Acrobot-v1 and our C4 grid world.

The stock grid worlds (MiniGrid) are egocentric, so rotating the picture is no symmetry of
their dynamics; ours is seen from above: the agent, the goal and the walls are planes of one
``N x N`` grid, and rotating the grid while cycling the moves maps an episode onto an episode.

``restore(env, observation)`` puts an environment into the state an observation shows (the
observation is the whole state for all three), which is what the symmetry tests need:
``step(g . s, sigma_g(a)) = g . step(s, a)``, same reward, same termination.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .symmetries import GRID_ENV_ID, GRID_MOVES, GRID_PLANES, GRID_SIZE, symmetry

GRID_MAX_STEPS = 30
EXAMPLE_SEED = 0  # the start state a model card shows (``example_observation``)
GRID_SOLVED = 0.85  # mean return; an optimal agent gets about 0.9 (1 - 0.9 * mean shortest path / 30)


class GridWorldC4(gym.Env[np.ndarray, int]):
    """A ``size x size`` grid: reach the goal, around ``n_walls`` random walls, within ``max_steps`` moves.

    Observation: ``[3 * size * size]`` float32, the agent, goal and wall planes (0/1), row-major.
    Actions: 0 up, 1 right, 2 down, 3 left; a move into a wall or off the grid stays put.
    Reward (MiniGrid's): ``1 - 0.9 * steps / max_steps`` on reaching the goal (the episode ends), else 0.
    Every layout is solvable; agent, goal and walls are drawn uniformly, so the start
    distribution is invariant under the rotations too.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}  # noqa: RUF012 - gymnasium's convention

    def __init__(
        self, size: int = GRID_SIZE, n_walls: int = 1, max_steps: int = GRID_MAX_STEPS, render_mode: str | None = None
    ) -> None:
        self.size, self.n_walls, self.max_steps = size, n_walls, max_steps
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0.0, 1.0, (len(GRID_PLANES) * size * size,), np.float32)
        self.action_space = spaces.Discrete(len(GRID_MOVES))
        self.agent = (0, 0)
        self.goal = (0, 1)
        self.walls: frozenset[tuple[int, int]] = frozenset()
        self.steps = 0

    # -- state <-> observation ----------------------------------------------------------------
    def observation(self) -> np.ndarray:
        planes = np.zeros((len(GRID_PLANES), self.size, self.size), np.float32)
        planes[0][self.agent] = 1.0
        planes[1][self.goal] = 1.0
        for wall in self.walls:
            planes[2][wall] = 1.0
        return planes.reshape(-1)

    def set_state(self, observation: np.ndarray, steps: int = 0) -> None:
        planes = np.asarray(observation).reshape(len(GRID_PLANES), self.size, self.size) > 0.5
        agent, goal = np.argwhere(planes[0]), np.argwhere(planes[1])
        if len(agent) != 1 or len(goal) != 1:
            raise ValueError("a grid observation shows exactly one agent and one goal")
        self.agent, self.goal = tuple(int(v) for v in agent[0]), tuple(int(v) for v in goal[0])
        self.walls = frozenset(tuple(int(v) for v in w) for w in np.argwhere(planes[2]))
        self.steps = steps

    # -- gymnasium ------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        cells = [(r, c) for r in range(self.size) for c in range(self.size)]
        while True:
            picks = self.np_random.choice(len(cells), size=self.n_walls + 2, replace=False)
            agent, goal, *walls = (cells[int(i)] for i in picks)
            self.agent, self.goal, self.walls = agent, goal, frozenset(walls)
            if self.shortest_path() is not None:
                break
        self.steps = 0
        return self.observation(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        dr, dc = GRID_MOVES[int(action)]
        r, c = self.agent[0] + dr, self.agent[1] + dc
        if 0 <= r < self.size and 0 <= c < self.size and (r, c) not in self.walls:
            self.agent = (r, c)
        self.steps += 1
        terminated = self.agent == self.goal
        reward = 1.0 - 0.9 * self.steps / self.max_steps if terminated else 0.0
        return self.observation(), reward, terminated, self.steps >= self.max_steps and not terminated, {}

    def shortest_path(self) -> int | None:
        """Moves from the agent to the goal around the walls (None: unreachable)."""
        seen, queue = {self.agent}, deque([(self.agent, 0)])
        while queue:
            (r, c), d = queue.popleft()
            if (r, c) == self.goal:
                return d
            for dr, dc in GRID_MOVES:
                nxt = (r + dr, c + dc)
                if 0 <= nxt[0] < self.size and 0 <= nxt[1] < self.size and nxt not in self.walls and nxt not in seen:
                    seen.add(nxt)
                    queue.append((nxt, d + 1))
        return None

    def render(self) -> np.ndarray:
        cell = 24
        colours = {"floor": (235, 235, 235), "wall": (90, 90, 90), "goal": (60, 170, 80), "agent": (210, 60, 50)}
        image = np.zeros((self.size * cell, self.size * cell, 3), np.uint8)
        for r in range(self.size):
            for c in range(self.size):
                kind = "floor"
                if (r, c) in self.walls:
                    kind = "wall"
                elif (r, c) == self.goal:
                    kind = "goal"
                if (r, c) == self.agent:
                    kind = "agent"
                image[r * cell + 1 : (r + 1) * cell - 1, c * cell + 1 : (c + 1) * cell - 1] = colours[kind]
        return image


if GRID_ENV_ID not in gym.registry:
    gym.register(GRID_ENV_ID, entry_point=GridWorldC4, reward_threshold=GRID_SOLVED)


@dataclass(frozen=True)
class Starts:
    """A CartPole start distribution other than gymnasium's (every coordinate uniform in ±0.05).

    ``width``: every coordinate uniform in ``±width``. ``half``: a start with ``θ < 0`` is reflected
    (``s -> -s``, the group's element), so the agent only ever starts with the pole upright or
    leaning right: the right mirror half of the distribution (the episodes still cross into the
    other half, so this restricts where an agent starts, not what it sees; docs/dqn.md).
    """

    width: float = 0.05
    half: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.width <= 0.2:  # beyond 0.2 rad the pole starts past CartPole's termination angle
            raise ValueError(f"start width {self.width} must be in (0, 0.2]")

    @property
    def default(self) -> bool:
        return self.width == 0.05 and not self.half

    def describe(self) -> str:
        text = f"every coordinate uniform in ±{self.width:g}"
        return text + (", reflected to θ ≥ 0 (the right half)" if self.half else "")


class _CartPoleStarts(gym.Wrapper):
    def __init__(self, env: gym.Env, starts: Starts) -> None:
        super().__init__(env)
        self.starts = starts

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        w = self.starts.width
        observation, info = self.env.reset(seed=seed, options={"low": -w, "high": w, **(options or {})})
        if self.starts.half and observation[2] < 0:
            observation = -observation
            restore(self.env, observation)
        return np.asarray(observation, dtype=np.float32), info


def make_env(env_id: str, render_mode: str | None = None, starts: Starts | None = None) -> gym.Env:
    """A gymnasium environment with a known symmetry (ours is registered on import of this module);
    ``starts``: another start distribution (CartPole only)."""
    symmetry(env_id)  # refuses environments we know no group of
    env = gym.make(env_id, render_mode=render_mode)
    if starts is not None and not starts.default:
        if env_id != "CartPole-v1":
            raise ValueError(f"start distributions are defined for CartPole-v1 only, not {env_id}")
        env = _CartPoleStarts(env, starts)
    return env


def solved_threshold(env_id: str) -> float:
    threshold = gym.spec(env_id).reward_threshold
    if threshold is None:  # pragma: no cover - all three have one
        raise ValueError(f"{env_id} has no solved threshold")
    return float(threshold)


def example_observation(env_id: str) -> list[float]:
    """A start state of ``env_id``: gymnasium's own reset (seed ``EXAMPLE_SEED``), as a model card's
    example, so that a client (the web page's example button) sends a state the agent can meet."""
    return list(_example_observation(env_id))


@functools.cache
def _example_observation(env_id: str) -> tuple[float, ...]:
    env = make_env(env_id)
    try:
        observation, _ = env.reset(seed=EXAMPLE_SEED)
    finally:
        env.close()
    # str() of a float32 is its shortest decimal that reads back as the same float32: short numbers
    # for a person to read, and the server, which rounds to float32, gets gymnasium's observation.
    return tuple(float(str(v)) for v in np.asarray(observation, dtype=np.float32))


def restore(env: gym.Env, observation: np.ndarray) -> None:
    """Put ``env`` (reset once before) into the state that ``observation`` shows."""
    inner = env.unwrapped
    obs = np.asarray(observation, dtype=np.float64)
    if isinstance(inner, GridWorldC4):
        inner.set_state(obs)
    elif inner.spec is not None and inner.spec.id == "Acrobot-v1":
        inner.state = np.array([np.arctan2(obs[1], obs[0]), np.arctan2(obs[3], obs[2]), obs[4], obs[5]])
    elif inner.spec is not None and inner.spec.id == "CartPole-v1":
        inner.state = obs.copy()
        inner.steps_beyond_terminated = None
    else:
        raise ValueError(f"cannot restore a state of {inner.spec.id if inner.spec else inner!r}")


Policy = Callable[[np.ndarray], np.ndarray]  # [E, D] observations -> [E] actions


def run_episodes(policy: Policy, env_id: str, episodes: int, seed: int, starts: Starts | None = None) -> list[float]:
    """Returns of ``episodes`` seeded episodes (seeds ``seed``, ``seed + 1``, ...), all stepped together:
    each step asks ``policy`` for the actions of every unfinished episode at once."""
    envs = [make_env(env_id, starts=starts) for _ in range(episodes)]
    observations = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns = [0.0] * episodes
    live = list(range(episodes))
    while live:
        actions = policy(np.stack([observations[i] for i in live]))
        still = []
        for i, action in zip(live, actions, strict=True):
            observations[i], reward, terminated, truncated, _ = envs[i].step(int(action))
            returns[i] += float(reward)
            if not (terminated or truncated):
                still.append(i)
        live = still
    for env in envs:
        env.close()
    return returns

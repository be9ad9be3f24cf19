"""Each environment's group is a symmetry of its dynamics and reward: step(g.s, sigma_g(a)) = g.step(s, a)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from app.equivariance.qvalues import SignedPermutation, StateActionGroup
from app.tasks.act.envs import GRID_SOLVED, GridWorldC4, make_env, restore, run_episodes, solved_threshold
from app.tasks.act.symmetries import GRID_ENV_ID, SYMMETRIES, symmetry

ENV_IDS = sorted(SYMMETRIES)


def _random_state(env_id: str, rng: np.random.Generator, env) -> np.ndarray:
    """A state to test from: random values inside the termination bounds, or a reset layout (grid)."""
    if env_id == "CartPole-v1":
        return rng.uniform([-2.3, -2.0, -0.2, -2.0], [2.3, 2.0, 0.2, 2.0]).astype(np.float32)
    if env_id == "Acrobot-v1":
        t1, t2 = rng.uniform(-np.pi, np.pi, 2)
        w1, w2 = rng.uniform(-4 * np.pi, 4 * np.pi), rng.uniform(-9 * np.pi, 9 * np.pi)
        return np.array([np.cos(t1), np.sin(t1), np.cos(t2), np.sin(t2), w1, w2], np.float32)
    obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
    return obs


def _step_from(env, state: np.ndarray, action: int) -> tuple[np.ndarray, float, bool]:
    restore(env, state)
    obs, reward, terminated, _, _ = env.step(action)
    return obs, reward, terminated


def _check(env_id: str, group: StateActionGroup, samples: int, seed: int = 0) -> list[str]:
    """Mismatches of the symmetry over random states, actions and group elements (empty: a symmetry)."""
    env, mirror = make_env(env_id), make_env(env_id)
    env.reset(seed=seed)
    mirror.reset(seed=seed)
    rng = np.random.default_rng(seed)
    failures = []
    for _ in range(samples):
        state = _random_state(env_id, rng, env)
        action = int(rng.integers(group.n_actions))
        obs, reward, terminated = _step_from(env, state, action)
        for g in range(1, group.order):
            g_state = group.act(torch.as_tensor(state), g).numpy()
            g_action = int(group.act_action(torch.tensor(action), g))
            g_obs, g_reward, g_terminated = _step_from(mirror, g_state, g_action)
            expected = group.act(torch.as_tensor(obs), g).numpy()
            if not np.allclose(g_obs, expected, atol=1e-5) or g_reward != reward or g_terminated != terminated:
                failures.append(f"{group.names[g]} from {state} with action {action}")
    return failures


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_the_group_is_a_symmetry_of_dynamics_and_reward(env_id: str) -> None:
    assert _check(env_id, symmetry(env_id).group(), samples=300) == []


def _wrong_groups() -> dict[str, StateActionGroup]:
    """Near misses of each symmetry, which the check must reject."""
    rotate = symmetry(GRID_ENV_ID).group().signed_permutation(1)
    reflect = symmetry("Acrobot-v1").group().signed_permutation(1)
    return {
        # the cart mirrored but the pole not
        "CartPole-v1": StateActionGroup("x", [(SignedPermutation.signs([-1, -1, 1, 1]), [1, 0])], ["g"], 4, 2),
        # torque -1 swapped with 0 instead of with +1
        "Acrobot-v1": StateActionGroup("x", [(reflect, [1, 0, 2])], ["g"], 6, 3),
        # the moves cycled the wrong way round
        GRID_ENV_ID: StateActionGroup("x", [(rotate, [1, 2, 3, 0])], ["g"], len(rotate.index), 4),
    }


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_the_check_catches_a_near_miss(env_id: str) -> None:
    assert _check(env_id, _wrong_groups()[env_id], samples=100) != []


def test_the_check_catches_a_wrong_state_map() -> None:
    # Acrobot: negating the cosines too is no symmetry.
    wrong = StateActionGroup("wrong", [(SignedPermutation.signs([-1.0] * 6), [2, 1, 0])], ["g"], 6, 3)
    assert _check("Acrobot-v1", wrong, samples=100) != []


def test_the_grid_rotates_counter_clockwise_and_cycles_the_moves() -> None:
    env = make_env(GRID_ENV_ID)
    env.reset(seed=0)
    inner = env.unwrapped
    assert isinstance(inner, GridWorldC4)
    inner.agent, inner.goal, inner.walls = (0, 1), (4, 4), frozenset({(2, 2)})
    rotated = symmetry(GRID_ENV_ID).group().act(torch.as_tensor(inner.observation()), 1).numpy()
    inner.set_state(rotated)
    # rot90 counter-clockwise sends cell (r, c) to (N-1-c, r).
    assert (inner.agent, inner.goal, inner.walls) == ((3, 0), (0, 4), frozenset({(2, 2)}))


def test_grid_layouts_are_solvable_and_the_reward_is_minigrids() -> None:
    env = make_env(GRID_ENV_ID)
    inner = env.unwrapped
    for seed in range(200):
        env.reset(seed=seed)
        assert inner.shortest_path() is not None
    env.reset(seed=1)
    inner.agent, inner.goal, inner.walls = (0, 0), (0, 1), frozenset()
    _, reward, terminated, truncated, _ = env.step(1)
    assert terminated and not truncated and reward == pytest.approx(1 - 0.9 / inner.max_steps)
    assert solved_threshold(GRID_ENV_ID) == GRID_SOLVED


def test_grid_render_shows_the_cells() -> None:
    env = make_env(GRID_ENV_ID, render_mode="rgb_array")
    env.reset(seed=0)
    image = env.render()
    assert image.dtype == np.uint8 and image.shape == (5 * 24, 5 * 24, 3)


def test_episodes_are_seeded_and_stepped_together() -> None:
    seen: list[int] = []

    def always_left(observations: np.ndarray) -> np.ndarray:
        seen.append(len(observations))
        return np.zeros(len(observations), np.int64)

    first = run_episodes(always_left, "CartPole-v1", 4, seed=3)
    assert seen[0] == 4 and seen[-1] >= 1 and all(a >= b for a, b in itertools.pairwise(seen))
    assert first == run_episodes(always_left, "CartPole-v1", 4, seed=3)
    assert all(0 < r < 100 for r in first)  # always pushing left drops the pole quickly


def test_unknown_environments_are_refused() -> None:
    with pytest.raises(KeyError, match="no known symmetry"):
        make_env("MountainCar-v0")

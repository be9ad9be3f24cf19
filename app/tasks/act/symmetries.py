"""Which group acts on which environment, as data: pure torch, no gymnasium (the server needs no simulator).

* ``CartPole-v1``, Z2: ``s -> -s`` (cart position and velocity, pole angle and angular velocity), left <-> right;
* ``Acrobot-v1``, Z2: observation ``[cos θ1, sin θ1, cos θ2, sin θ2, ω1, ω2]``; the reflection negates the
  sines and both angular velocities (cosines kept), torque -1 <-> +1 (0 stays);
* ``equiserve/GridWorldC4-v0`` (ours, ``envs.py``), C4: the whole grid (agent, goal and wall planes)
  rotated by 90° counter-clockwise, the four moves cycled (up -> left -> down -> right -> up).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.equivariance.qvalues import SignedPermutation, StateActionGroup

GRID_ENV_ID = "equiserve/GridWorldC4-v0"
GRID_SIZE = 5
GRID_PLANES = ("agent", "goal", "wall")  # the observation: one N x N plane each, flattened row-major
GRID_MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # (row, column) steps of up, right, down, left


@dataclass(frozen=True)
class Symmetry:
    """An environment's observation size, actions and symmetry group."""

    env_id: str
    group_name: str
    obs_dim: int
    action_names: tuple[str, ...]
    build: Callable[[], StateActionGroup]

    @property
    def n_actions(self) -> int:
        return len(self.action_names)

    def group(self) -> StateActionGroup:
        return _group(self.env_id)


def _reflection(sign: list[float], action_map: list[int]) -> StateActionGroup:
    return StateActionGroup(
        "z2", [(SignedPermutation.signs(sign), action_map)], ["reflect"], len(sign), len(action_map)
    )


def grid_rotation_index(size: int, planes: int) -> list[int]:
    """Gather index of a 90° counter-clockwise rotation of ``planes`` flattened ``size x size`` planes."""
    cells = torch.rot90(torch.arange(size * size).reshape(size, size), 1, dims=(0, 1)).reshape(-1)
    return torch.cat([cells + p * size * size for p in range(planes)]).tolist()


def grid_c4_group(size: int = GRID_SIZE) -> StateActionGroup:
    # Rotating the grid counter-clockwise turns "up" into "left", "right" into "up", and so on.
    rotate = SignedPermutation.permutation(grid_rotation_index(size, len(GRID_PLANES)))
    return StateActionGroup(
        "c4",
        [(rotate, [3, 0, 1, 2])],
        ["rot90"],
        size * size * len(GRID_PLANES),
        4,
        element_names=["identity", "rot90", "rot180", "rot270"],
    )


SYMMETRIES: dict[str, Symmetry] = {
    s.env_id: s
    for s in (
        Symmetry("CartPole-v1", "z2", 4, ("left", "right"), lambda: _reflection([-1.0] * 4, [1, 0])),
        Symmetry(
            "Acrobot-v1",
            "z2",
            6,
            ("torque -1", "torque 0", "torque +1"),
            lambda: _reflection([1.0, -1.0, 1.0, -1.0, -1.0, -1.0], [2, 1, 0]),
        ),
        Symmetry(GRID_ENV_ID, "c4", GRID_SIZE * GRID_SIZE * len(GRID_PLANES), ("up", "right", "down", "left"),
                 grid_c4_group),
    )
}  # fmt: skip


def symmetry(env_id: str) -> Symmetry:
    if env_id not in SYMMETRIES:
        raise KeyError(f"no known symmetry for environment {env_id!r}; choose from {sorted(SYMMETRIES)}")
    return SYMMETRIES[env_id]


@functools.cache
def _group(env_id: str) -> StateActionGroup:
    return SYMMETRIES[env_id].build()

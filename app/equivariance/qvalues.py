"""Equivariant Q-values: a group acting on states by signed permutations and on actions by permutations.

An environment symmetry pairs a map of observation vectors with a permutation of the discrete
actions (CartPole: ``s -> -s`` with left <-> right). Every element ``g`` here is stored as

* a *signed permutation* of the observation: ``(g . s)[i] = sign_g[i] * s[index_g[i]]``, kept as ONE
  gather index ``obs_gather[g]`` into the doubled vector ``[s, -s]`` (so acting with all |G| elements
  is one gather, and composition is composition of permutations);
* a permutation of the actions, as a ``PermutationGroup`` (``actions``) with the same element order:
  ``(P_g q)[a] = q[perm_g[a]]`` on Q-value vectors, and ``a -> sigma_g(a)`` on chosen actions.

The joint closure is computed once, as a ``PermutationGroup`` on the disjoint union of the ``2D``
signed coordinates and the ``A`` actions, so the group axioms hold by construction.

Equivariance of Q-values reads ``Q_G(g . s) = P_g Q_G(s)``, i.e. ``Q_G(g . s)[sigma_g(a)] = Q_G(s)[a]``.
The methods (``combine_q``) are those of ``methods.combine`` on the aligned copies
``P_g⁻¹ Q(g . s)``; only equizero's selection differs: for Q-learning the authors pick the copy with
the largest Q-value, ``g* = argmax_g max_a Q(g . s, a)`` ("maximizing the Q-values").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .groups import FiniteGroup, PermutationGroup
from .lambda_net import LambdaNet
from .methods import Combined, Method, ZeroLoss, combine
from .model import Copies, EquivariantModel

__all__ = [
    "QValueModel",
    "SignedPermutation",
    "StateActionGroup",
    "combine_q",
]


@dataclass(frozen=True)
class SignedPermutation:
    """``(g . s)[i] = sign[i] * s[index[i]]`` on observation vectors of length ``len(index)``."""

    index: tuple[int, ...]
    sign: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.index) != len(self.sign):
            raise ValueError("one sign per coordinate is required")
        if sorted(self.index) != list(range(len(self.index))):
            raise ValueError(f"{self.index} is not a permutation of the coordinates")
        if any(s not in (-1.0, 1.0) for s in self.sign):
            raise ValueError("signs must be +1 or -1")

    @classmethod
    def signs(cls, sign: Sequence[float]) -> SignedPermutation:
        """Coordinates stay in place; some are negated."""
        return cls(tuple(range(len(sign))), tuple(float(s) for s in sign))

    @classmethod
    def permutation(cls, index: Sequence[int]) -> SignedPermutation:
        """Coordinates are permuted (gather convention); none negated."""
        return cls(tuple(int(i) for i in index), (1.0,) * len(index))

    def doubled(self) -> Tensor:
        """The gather index of ``g`` on ``[s, -s]``: a permutation of ``2D`` ids."""
        d = len(self.index)
        index = torch.tensor(self.index, dtype=torch.long)
        positive = torch.tensor(self.sign) > 0
        return torch.cat([torch.where(positive, index, index + d), torch.where(positive, index + d, index)])


class StateActionGroup(FiniteGroup):
    """A finite group acting on observations ``[..., D]`` (signed permutations) and on ``A`` actions.

    ``generators``: pairs (signed permutation of the observation, value map of the actions:
    action ``a`` of state ``s`` becomes ``action_map[a]`` in state ``g . s``). Element 0 is the identity.
    """

    def __init__(
        self,
        name: str,
        generators: Sequence[tuple[SignedPermutation, Sequence[int]]],
        generator_names: Sequence[str],
        obs_dim: int,
        n_actions: int,
        element_names: Sequence[str] | None = None,
    ) -> None:
        """``element_names`` renames the elements, in closure order (default: words in the generators)."""
        joint_gens, action_gens = [], []
        for obs_map, action_map in generators:
            if len(obs_map.index) != obs_dim or len(action_map) != n_actions:
                raise ValueError(f"a generator of {name!r} does not fit {obs_dim} coordinates and {n_actions} actions")
            gather = torch.argsort(torch.tensor(action_map, dtype=torch.long))  # value map -> gather index
            action_gens.append(gather)
            joint_gens.append(torch.cat([obs_map.doubled(), gather + 2 * obs_dim]))
        joint = PermutationGroup(name, joint_gens, generator_names, size=2 * obs_dim + n_actions)
        self.actions = PermutationGroup(f"{name}-actions", action_gens, generator_names, size=n_actions)
        if not torch.equal(self.actions.perms, joint.perms[:, 2 * obs_dim :] - 2 * obs_dim):
            # Two states' maps with one action map would make "the action g maps a to" ambiguous.
            raise ValueError(f"group {name!r} must permute the actions faithfully (one action map per element)")
        names = list(element_names) if element_names is not None else joint.names
        if len(names) != joint.order:
            raise ValueError(f"group {name!r} has {joint.order} elements, not {len(names)}")
        super().__init__(name, names, joint.perms)
        self.obs_dim = obs_dim
        self.n_actions = n_actions
        self.obs_gather = joint.perms[:, : 2 * obs_dim]  # [|G|, 2D]; its first D columns give g . s
        self._cache: dict[torch.device, Tensor] = {}

    def _obs_gather(self, device: torch.device) -> Tensor:
        if device not in self._cache:
            self._cache[device] = self.obs_gather[:, : self.obs_dim].to(device)
        return self._cache[device]

    def signed_permutation(self, g: int) -> SignedPermutation:
        """Element ``g``'s action on observations, unpacked (index, sign)."""
        gather = self.obs_gather[g, : self.obs_dim]
        sign = torch.where(gather < self.obs_dim, 1.0, -1.0)
        return SignedPermutation(tuple((gather % self.obs_dim).tolist()), tuple(sign.tolist()))

    # -- observations ---------------------------------------------------------------------------
    def act(self, x: Tensor, g: int) -> Tensor:
        """Reference (unfused) action of ``g`` on observations ``[..., D]``: index, then sign."""
        element = self.signed_permutation(g)
        index = torch.tensor(element.index, device=x.device)
        return x.index_select(-1, index) * torch.tensor(element.sign, dtype=x.dtype, device=x.device)

    def expand(self, x: Tensor) -> Tensor:
        """``[B, D] -> [|G|*B, D]``, copy-major, in one gather from ``[s, -s]``."""
        n, batch = self.order, x.shape[0]
        doubled = torch.cat([x, -x], dim=-1).unsqueeze(0).expand(n, *x.shape[:-1], 2 * self.obs_dim)
        return self._gather_per_copy(doubled, self._obs_gather(x.device), dim=-1).reshape(n * batch, *x.shape[1:])

    # -- actions and Q-values -------------------------------------------------------------------
    def act_action(self, actions: Tensor, g: int) -> Tensor:
        """``a -> sigma_g(a)`` on action ids."""
        return self.actions.act(actions, g)

    def act_q(self, q: Tensor, g: int) -> Tensor:
        """``P_g q`` for Q-values ``[..., A]``."""
        return self.actions.act_scores(q, g)


def combine_q(
    aligned: Tensor,
    method: Method | str,
    *,
    log_lambda: Tensor | None = None,
    straight_through: bool = False,
) -> Combined:
    """``methods.combine`` for aligned Q-values ``[|G|, B, A]``: equizero picks the copy with the
    largest Q-value (``ZeroLoss.NEG_MAX_VALUE``); copies tied for it share the weight (a state
    fixed by ``g`` gives two copies with the same Q-values), which keeps equizero exactly
    equivariant there. With ``straight_through`` the forward value is the selected copy and the
    gradient equitune's."""
    return combine(
        aligned, method, log_lambda=log_lambda, zero_loss=ZeroLoss.NEG_MAX_VALUE, straight_through=straight_through
    )


class QValueModel(EquivariantModel):
    """A Q-network ``head(features(s))`` made equivariant over a ``StateActionGroup``.

    One fused pass computes all |G| copies ``Q(g . s)`` of a batch, their features (what the
    λ-net scores) and the aligned ``P_g⁻¹ Q(g . s)``; ``combine_q`` then serves every method.

    ``equizero_straight_through`` (training mode only): equizero's gradient is equitune's, as the
    paper trains classifiers. Off (the default), the gradient of equizero's output reaches only the
    copy it selected (tied copies share it), so a TD loss measured on that copy corrects that copy:
    straight-through spreads the correction over the mean of the copies and leaves the selected
    copy's error in place, see docs/dqn.md.
    """

    group: StateActionGroup
    equizero_straight_through: bool = False

    def __init__(
        self,
        features: nn.Module | Callable[[Tensor], Tensor],
        head: nn.Module | Callable[[Tensor], Tensor],
        group: StateActionGroup,
        *,
        lambda_net: LambdaNet | None = None,
    ) -> None:
        super().__init__(
            features, head, group, lambda_net=lambda_net, output="permutation", output_perms=group.actions.perms
        )

    def combine(self, copies: Copies, method: Method | str) -> Combined:
        straight_through = self.training and self.equizero_straight_through
        return combine_q(copies.aligned, method, log_lambda=copies.log_lambda, straight_through=straight_through)

    @torch.no_grad()
    def reference(self, x: Tensor, method: Method | str = Method.EQUITUNE) -> Tensor:
        """The unfused definition: one network call per element, per-element actions (for tests)."""
        aligned, log_lambdas = [], []
        for g in range(self.group.order):
            features = self.encoder(self.group.act(x, g))
            aligned.append(self.group.act_q(self.head(features), self.group.inverse(g)))
            if self.lambda_net is not None:
                log_lambdas.append(self.lambda_net(features))
        log_lambda = torch.stack(log_lambdas) if log_lambdas else None
        return combine_q(torch.stack(aligned), method, log_lambda=log_lambda).output

"""Q-value groups and methods: Q_G(g.s) = P_g Q_G(s) for all but vanilla, fixed states included;
the fused pass equals the per-copy reference loop; equizero maximises the Q-value."""

from __future__ import annotations

import pytest
import torch

from app.equivariance import Method
from app.equivariance.lambda_net import LambdaNet
from app.equivariance.qvalues import QValueModel, SignedPermutation, StateActionGroup, combine_q
from app.tasks.act.qnet import QNet, equivariant
from app.tasks.act.symmetries import GRID_ENV_ID, SYMMETRIES, symmetry

ENV_IDS = sorted(SYMMETRIES)
EQUIVARIANT = [Method.EQUITUNE, Method.EQUIZERO, Method.LAMBDA]


def _model(env_id: str, seed: int = 0) -> QValueModel:
    torch.manual_seed(seed)
    sym = symmetry(env_id)
    qnet = QNet(sym.obs_dim, sym.n_actions, (16, 16))
    return equivariant(qnet, sym.group(), LambdaNet(16)).eval()  # a random, non-constant λ-net


def _states(env_id: str, n: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, symmetry(env_id).obs_dim, generator=generator)


def _fixed_states(env_id: str) -> torch.Tensor:
    """States that some group elements fix: the physical ones, and group averages of random ones."""
    group = symmetry(env_id).group()
    x = _states(env_id, 3, seed=5)
    everything = sum(group.act(x, g) for g in range(group.order))  # fixed by every element
    rows = [everything]
    if env_id == "CartPole-v1":
        rows.append(torch.zeros(1, 4))  # upright, centred, at rest
    elif env_id == "Acrobot-v1":
        rows.append(torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]]))  # hanging, upright
    else:
        rows.append(x + group.act(x, 2))  # fixed by rot180 only
    return torch.cat(rows)


def _equivariance_gap(model: QValueModel, x: torch.Tensor, method: Method) -> float:
    group = model.group
    base = model.predict(x, method).output
    gaps = [
        (model.predict(group.act(x, g), method).output - group.act_q(base, g)).abs().max().item()
        for g in range(group.order)
    ]
    return max(gaps)


# -- the group ----------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_actions_compose_like_the_group(env_id: str) -> None:
    group = symmetry(env_id).group()
    x = _states(env_id, 4)
    q = torch.randn(4, group.n_actions)
    for g in range(group.order):
        for h in range(group.order):
            gh = group.compose(g, h)
            torch.testing.assert_close(group.act(group.act(x, h), g), group.act(x, gh), rtol=0, atol=0)
            torch.testing.assert_close(group.act_q(group.act_q(q, h), g), group.act_q(q, gh), rtol=0, atol=0)
    fused = group.expand(x).reshape(group.order, 4, -1)
    reference = torch.stack([group.act(x, g) for g in range(group.order)])
    assert torch.equal(fused, reference)


def test_group_orders_and_names() -> None:
    assert symmetry("CartPole-v1").group().names == ["identity", "reflect"]
    assert symmetry(GRID_ENV_ID).group().names == ["identity", "rot90", "rot180", "rot270"]
    acrobot = symmetry("Acrobot-v1").group()
    element = acrobot.signed_permutation(1)
    assert element.sign == (1.0, -1.0, 1.0, -1.0, -1.0, -1.0) and element.index == tuple(range(6))
    assert acrobot.act_action(torch.tensor([0, 1, 2]), 1).tolist() == [2, 1, 0]


def test_bad_generators_are_refused() -> None:
    with pytest.raises(ValueError, match="not a permutation"):
        SignedPermutation((0, 0), (1.0, 1.0))
    with pytest.raises(ValueError, match="faithfully"):  # the state map has order 2, the action map order 1
        StateActionGroup("z2", [(SignedPermutation.signs([-1.0, -1.0]), [0, 1])], ["g"], 2, 2)
    with pytest.raises(ValueError, match="does not fit"):
        StateActionGroup("z2", [(SignedPermutation.signs([-1.0]), [1, 0])], ["g"], 2, 2)


# -- equivariance ---------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("method", EQUIVARIANT)
def test_methods_are_equivariant(env_id: str, method: Method) -> None:
    assert _equivariance_gap(_model(env_id), _states(env_id, 32), method) < 1e-5


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("method", EQUIVARIANT)
def test_methods_are_equivariant_at_states_the_group_fixes(env_id: str, method: Method) -> None:
    model, x = _model(env_id), _fixed_states(env_id)
    assert _equivariance_gap(model, x, method) < 1e-5
    # Fixed by every element, Q_G(s) must itself be invariant under the action permutations.
    everything = model.predict(x[:3], method).output
    for g in range(model.group.order):
        torch.testing.assert_close(model.group.act_q(everything, g), everything, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_vanilla_is_not_equivariant(env_id: str) -> None:
    # The check above can fail: an unconstrained network breaks it.
    assert _equivariance_gap(_model(env_id), _states(env_id, 32), Method.VANILLA) > 1e-3


def test_equizero_ties_share_weight_at_a_fixed_state() -> None:
    model = _model("CartPole-v1")
    combined = model.predict(torch.zeros(1, 4), Method.EQUIZERO)
    torch.testing.assert_close(combined.weights, torch.full((2, 1), 0.5))
    q = combined.output[0]
    torch.testing.assert_close(q[0], q[1])  # Q(0, left) = Q(0, right): the upright state has no preference


# -- fused = reference, and the methods themselves --------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("method", list(Method))
def test_fused_pass_equals_the_per_copy_loop(env_id: str, method: Method) -> None:
    model = _model(env_id)
    x = torch.cat([_states(env_id, 16), _fixed_states(env_id)])
    torch.testing.assert_close(model.predict(x, method).output, model.reference(x, method), rtol=1e-5, atol=1e-6)


def test_vanilla_is_the_plain_network() -> None:
    model = _model("Acrobot-v1")
    x = _states("Acrobot-v1", 8)
    # the fused pass runs more rows than the plain call, so BLAS may round differently
    torch.testing.assert_close(model.predict(x, Method.VANILLA).output, model.head(model.encoder(x)))


def test_equizero_picks_the_copy_with_the_largest_q_value() -> None:
    aligned = torch.tensor([[[1.0, 2.0]], [[3.0, -5.0]], [[0.0, 2.5]]])  # copy 1 has the largest Q (3)
    out = combine_q(aligned, Method.EQUIZERO)
    assert out.selected.tolist() == [1]
    assert torch.equal(out.output, aligned[1])
    # The classification loss (-max softmax probability) would pick copy 1 too here, but not in general:
    spread = torch.tensor([[[10.0, 9.9]], [[1.0, -3.0]]])  # copy 0: larger Q, flatter softmax
    assert combine_q(spread, Method.EQUIZERO).selected.tolist() == [0]


def test_equizero_straight_through_gradient_is_equitunes() -> None:
    aligned = torch.randn(4, 3, 2, requires_grad=True)
    out = combine_q(aligned, Method.EQUIZERO, straight_through=True)
    torch.testing.assert_close(out.output, combine_q(aligned.detach(), Method.EQUIZERO).output)
    out.output.sum().backward()
    torch.testing.assert_close(aligned.grad, torch.full_like(aligned, 0.25))


def test_lambda_trains_the_lambda_net_through_the_features() -> None:
    model = _model(GRID_ENV_ID).train()
    model.predict(_states(GRID_ENV_ID, 8), Method.LAMBDA).output.sum().backward()
    assert model.lambda_net is not None and model.lambda_net.mlp[0].weight.grad is not None
    assert model.lambda_net.mlp[0].weight.grad.abs().sum() > 0

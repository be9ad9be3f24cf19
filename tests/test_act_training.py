"""DQN training internals: equizero's TD gradient reaches the copy it selects (not the mean of the
copies), the TD-target ablations value the next state as documented, and the CartPole start
distributions (harder, one mirror half) are what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.equivariance import Method
from app.tasks.act.envs import Starts, make_env, run_episodes
from app.tasks.act.qnet import QNet, equivariant
from app.tasks.act.symmetries import symmetry
from app.tasks.act.training import DQNConfig, Target, next_state_values, train_dqn


def _cartpole_model(seed: int = 0) -> tuple[QNet, object]:
    torch.manual_seed(seed)
    qnet = QNet(4, 2, (16, 16))
    return qnet, equivariant(qnet, symmetry("CartPole-v1").group())


def _td_gradient_on_copies(straight_through: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """d(loss on the taken action) / d(aligned copy), in training mode, and which copy was selected."""
    _, model = _cartpole_model()
    model.train()
    model.equizero_straight_through = straight_through
    states = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
    copies = model.copies(states)
    aligned = copies.aligned.detach().requires_grad_(True)
    combined = model.combine(type(copies)(copies.features, copies.log_lambda, aligned), Method.EQUIZERO)
    actions = torch.randint(0, 2, (32, 1), generator=torch.Generator().manual_seed(4))
    target = torch.zeros(32, 1)
    torch.nn.functional.smooth_l1_loss(combined.output.gather(1, actions), target).backward()
    return aligned.grad, combined.weights


def test_equizero_td_gradient_reaches_only_the_selected_copy() -> None:
    grad, weights = _td_gradient_on_copies(straight_through=False)
    not_selected = weights == 0  # [|G|, B]; random states: no ties
    assert not_selected.sum() == 32
    assert torch.all(grad[not_selected] == 0)
    assert torch.all(grad[~not_selected].abs().sum(-1) > 0)  # the selected copy gets the whole correction


def test_the_old_straight_through_estimator_updates_the_copy_not_selected() -> None:
    grad, weights = _td_gradient_on_copies(straight_through=True)
    not_selected = weights == 0
    assert torch.all(grad[not_selected].abs().sum(-1) > 0)  # what the fix removes
    torch.testing.assert_close(grad[0], grad[1])  # equitune's gradient: half to each copy


def test_the_fix_is_what_training_uses() -> None:
    config = DQNConfig("CartPole-v1", Method.EQUIZERO, steps=8, hidden=(16, 16), overrides=dict(learning_starts=100))
    assert not train_dqn(config, progress_bar=False).model.equizero_straight_through
    config.equizero_straight_through = True
    assert train_dqn(config, progress_bar=False).model.equizero_straight_through


def test_the_target_ablations_value_the_next_state_as_documented() -> None:
    config = DQNConfig("CartPole-v1", Method.EQUIZERO, steps=8, hidden=(16, 16), overrides=dict(learning_starts=100))
    policy = train_dqn(config, progress_bar=False).agent.policy
    with torch.no_grad():  # online and target differ, so the double target is not the plain one
        for p in policy.q_net_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = torch.randn(64, 4, generator=torch.Generator().manual_seed(9))
    target = policy.q_net_target.model
    aligned = target.copies(obs).aligned  # [2, B, 2]
    torch.testing.assert_close(next_state_values(policy, obs, Target.SAME), aligned.amax(-1).amax(0))
    torch.testing.assert_close(next_state_values(policy, obs, Target.VANILLA), aligned[0].amax(-1))
    torch.testing.assert_close(next_state_values(policy, obs, Target.EQUITUNE), aligned.mean(0).amax(-1))
    online = policy.q_net.model.copies(obs).aligned
    flat = online.permute(1, 0, 2).reshape(64, -1).argmax(-1)  # online picks (copy, action) jointly
    g, a = flat // 2, flat % 2
    expected = aligned[g, torch.arange(64), a]
    torch.testing.assert_close(next_state_values(policy, obs, Target.DOUBLE), expected)
    assert not torch.allclose(expected, aligned.amax(-1).amax(0))


def test_double_target_equals_the_plain_one_when_online_and_target_agree() -> None:
    policy = train_dqn(DQNConfig("CartPole-v1", Method.EQUIZERO, steps=8, hidden=(16, 16),
                                 overrides=dict(learning_starts=100)), progress_bar=False).agent.policy  # fmt: skip
    policy.q_net_target.load_state_dict(policy.q_net.state_dict())
    obs = torch.randn(64, 4)
    torch.testing.assert_close(
        next_state_values(policy, obs, Target.DOUBLE), next_state_values(policy, obs, Target.SAME)
    )


@pytest.mark.parametrize("target", list(Target))
def test_every_target_trains(target: Target) -> None:
    config = DQNConfig("CartPole-v1", Method.EQUIZERO, steps=96, hidden=(16, 16), target=target,
                       overrides=dict(learning_starts=32, train_freq=32, gradient_steps=2))  # fmt: skip
    before = [p.detach().clone() for p in train_dqn(DQNConfig("CartPole-v1", steps=1, hidden=(16, 16)),
                                                    progress_bar=False).qnet.parameters()]  # fmt: skip
    after = list(train_dqn(config, progress_bar=False).qnet.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_start_distributions() -> None:
    wide, half = Starts(0.15), Starts(0.15, half=True)
    starts = {
        s: np.stack([make_env("CartPole-v1", starts=s).reset(seed=i)[0] for i in range(200)]) for s in (wide, half)
    }
    assert np.abs(starts[wide]).max() <= 0.15 and np.abs(starts[wide]).max() > 0.1
    assert (starts[wide][:, 2] < 0).any()
    assert (starts[half][:, 2] >= 0).all()
    # the half is the wide distribution with its θ < 0 starts mirrored (s -> -s), seed for seed
    np.testing.assert_allclose(np.abs(starts[half]), np.abs(starts[wide]), rtol=0, atol=1e-7)
    env = make_env("CartPole-v1", starts=half)
    observation, _ = env.reset(seed=int(np.argmax(starts[wide][:, 2] < 0)))
    np.testing.assert_allclose(env.unwrapped.state, observation, atol=1e-7)  # the simulator starts there too
    assert not isinstance(make_env("CartPole-v1", starts=Starts()), type(env))  # gymnasium's own: no wrapper
    with pytest.raises(ValueError, match="CartPole-v1 only"):
        make_env("Acrobot-v1", starts=wide)
    with pytest.raises(ValueError, match="width"):
        Starts(0.3)
    assert run_episodes(lambda o: np.zeros(len(o), dtype=np.int64), "CartPole-v1", 3, 0, wide) == run_episodes(
        lambda o: np.zeros(len(o), dtype=np.int64), "CartPole-v1", 3, 0, wide
    )

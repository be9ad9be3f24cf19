"""``train-dqn`` on a few hundred steps; SB3 hosting (``play`` against a real server: tests/test_api_act.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.equivariance import Method
from app.tasks.act.cli import main
from app.tasks.act.messages import ActRequest
from app.tasks.act.training import DQNConfig, load_qnet, train_dqn
from tests.acttools import load_runner, read_act_spec, write_tiny_agent


def test_train_dqn_writes_a_servable_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sb3_default_logs = tmp_path / "sb3-logs"  # where SB3's own logger would make its folder
    monkeypatch.setenv("SB3_LOGDIR", str(sb3_default_logs))
    args = ["train-dqn", "--env", "CartPole-v1", "--steps", "300", "--hidden", "8", "--name", "mini",
            "--models-dir", str(tmp_path), "--eval-episodes", "2", "--quiet"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 300 and report["episodes"] == 2
    assert not sb3_default_logs.exists()
    spec = read_act_spec(tmp_path / "mini")
    assert spec.env == "CartPole-v1" and spec.hidden == (8,) and spec.lambda_net is None
    assert spec.training["method"] == "vanilla" and spec.training["greedy_return"]["episodes"] == 2
    runner = load_runner(tmp_path / "mini")
    assert runner.split(ActRequest([[0.0] * 4]))


def test_lambda_on_a_frozen_agent_trains_only_the_lambda_net(tmp_path: Path) -> None:
    agent = write_tiny_agent(tmp_path, "equiserve/GridWorldC4-v0")
    before = load_qnet(agent, "equiserve/GridWorldC4-v0", (8,)).state_dict()
    config = DQNConfig("equiserve/GridWorldC4-v0", Method.LAMBDA, steps=200, init=agent, freeze_q=True,
                       hidden=(8,), overrides={"learning_starts": 50})  # fmt: skip
    result = train_dqn(config, progress_bar=False)
    for key, value in result.qnet.state_dict().items():
        assert torch.equal(value, before[key]), key
    lam = result.model.lambda_net
    assert lam is not None and lam.mlp[-1].weight.abs().sum() > 0  # it started at zero (uniform λ)
    assert result.episodes and all(step <= 200 for step, _ in result.episodes)


@pytest.mark.parametrize("method", [Method.VANILLA, Method.EQUIZERO])
def test_sb3_sees_the_combined_q_values(method: Method) -> None:
    config = DQNConfig("CartPole-v1", method, steps=100, hidden=(8,), overrides={"learning_starts": 10,
                       "train_freq": 10, "gradient_steps": 2})  # fmt: skip
    result = train_dqn(config, progress_bar=False)
    policy = result.agent.policy
    obs = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(policy.q_net(obs), result.model.predict(obs, method).output)
        if method is Method.EQUIZERO:  # ... and they are equivariant
            torch.testing.assert_close(policy.q_net(-obs), policy.q_net(obs).flip(-1))
    assert policy.q_net_target.method is method


def test_a_freeze_without_a_pretrained_agent_is_refused() -> None:
    with pytest.raises(ValueError, match="needs init and method lambda"):
        DQNConfig("CartPole-v1", Method.LAMBDA, freeze_q=True)

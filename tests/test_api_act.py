"""``POST /v1/models/{name}/act`` on the shipped agents: equivariant answers over HTTP, the
diagnostics, clear refusals, and ``play`` driving a real ``serve`` process on 127.0.0.1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.tasks.act.cli import main
from app.tasks.act.symmetries import GRID_ENV_ID, symmetry
from tests.apptools import ROOT, free_port, make_settings, serving, set_limits, start_server, wait_ready

MODELS = ROOT / "models"
AGENTS = {"dqn-cartpole": "CartPole-v1", "dqn-grid": GRID_ENV_ID}


def _states(env_id: str, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, symmetry(env_id).obs_dim, generator=generator)
    if env_id == GRID_ENV_ID:  # one-hot planes: keep them 0/1 so the state is a real grid
        x = (x > 0.5).float()
    return x


@pytest.mark.parametrize("name", sorted(AGENTS))
@pytest.mark.parametrize("method", ["equitune", "equizero", "lambda"])
async def test_answers_over_http_are_equivariant(name: str, method: str) -> None:
    env_id = AGENTS[name]
    group = symmetry(env_id).group()
    x = _states(env_id, 4)
    async with serving(make_settings(MODELS, models=list(AGENTS))) as (client, _):

        async def q_values(states: torch.Tensor) -> torch.Tensor:
            body = {"observations": states.tolist(), "method": method}
            response = await client.post(f"/v1/models/{name}/act", json=body)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["env"] == env_id and body["method"] == method and len(body["results"]) == len(states)
            for result in body["results"]:
                assert result["action"] == int(np.argmax(result["q_values"]))
                assert len(result["transforms"]) == group.order
                assert math.isclose(sum(t["lambda"] for t in result["transforms"]), 1.0, rel_tol=1e-5)
                assert (result["selected_transform"] is not None) == (method == "equizero")
            return torch.tensor([r["q_values"] for r in body["results"]])

        base = await q_values(x)
        for g in range(group.order):
            torch.testing.assert_close(await q_values(group.act(x, g)), group.act_q(base, g), rtol=1e-5, atol=1e-5)


async def test_vanilla_over_http_is_not_equivariant() -> None:
    # The check above can fail: the plain network breaks it on the same states.
    x = _states("CartPole-v1", 4)
    async with serving(make_settings(MODELS, models=["dqn-cartpole"])) as (client, _):
        answers = []
        for states in (x, -x):
            body = {"observations": states.tolist(), "method": "vanilla"}
            response = await client.post("/v1/models/dqn-cartpole/act", json=body)
            answers.append(torch.tensor([r["q_values"] for r in response.json()["results"]]))
    assert (answers[1] - answers[0].flip(-1)).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"observations": [[0.0] * 5]}, 422, "observation 0 has shape [5]"),
        ({"observations": [[0.0] * 4] * 3}, 422, "3 observations"),
        ({"observations": [[0.0] * 4], "method": "best"}, 422, "best"),
        ({"observations": []}, 422, "observations"),
        ({"observations": [[0.0] * 4], "extra": 1}, 422, "extra"),
        ({"observations": [[0.0, 1e39, 0.0, 0.0]]}, 422, "NaN or infinity"),
    ],
)
async def test_bad_requests_are_refused_with_what_was_wrong(
    body: dict, status: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_limits(monkeypatch, "act", max_observations=2)
    async with serving(make_settings(MODELS, models=["dqn-cartpole"])) as (client, _):
        response = await client.post("/v1/models/dqn-cartpole/act", json=body)
        assert response.status_code == status, response.text
        assert message in response.text
        # ... and the server still answers the next request.
        ok = await client.post("/v1/models/dqn-cartpole/act", json={"observations": [[0.0] * 4]})
        assert ok.status_code == 200
        missing = await client.post("/v1/models/nope/act", json={"observations": [[0.0] * 4]})
        assert missing.status_code == 404


async def test_the_card_describes_the_agent() -> None:
    async with serving(make_settings(MODELS, models=["dqn-cartpole"])) as (client, _):
        (card,) = (await client.get("/v1/models")).json()["models"]
    assert card["task"] == "act" and card["group"] == "z2" and card["lambda_trained"] is True
    assert card["env"] == "CartPole-v1" and card["actions"] == ["left", "right"] and card["observation_dim"] == 4
    assert set(card["methods"]) == {"vanilla", "equitune", "equizero", "lambda"}


@pytest.mark.slow
def test_play_drives_a_real_server(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    server = start_server(MODELS, port, "--models", "dqn-cartpole", "--api-key", "k")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, server)
        args = ["play", "--url", base, "--model", "dqn-cartpole", "--episodes", "2", "--seed", "7"]
        assert main([*args, "--method", "equitune", "--api-key", "k"]) == 0
        out = capsys.readouterr().out
        # The shipped agent solves CartPole: the served policy gets the 500-step cap in both episodes.
        assert "episode 0 (seed 7): return 500" in out and "episode 1 (seed 8): return 500" in out
        assert "mean return 500.00" in out
        # Without the key the server refuses, and play says so instead of crashing.
        assert main(args) == 1
        assert "401" in capsys.readouterr().err
        # An Acrobot state (6 numbers) sent to a CartPole agent: the 422 names the observation.
        assert main([*args, "--env", "Acrobot-v1", "--api-key", "k"]) == 1
        assert "observation 0 has shape [6]" in capsys.readouterr().err
    finally:
        server.terminate()
        server.wait(timeout=30)

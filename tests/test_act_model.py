"""The act model: request validation, one fused pass for a mixed batch, per-copy diagnostics, the spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from app.config import DEFAULT_MODELS_DIR
from app.equivariance import Method
from app.errors import InvalidInput
from app.repository import ModelLoadError
from app.tasks.act import model as runner_module
from app.tasks.act.messages import ActRequest
from app.tasks.act.model import ActItem, ActModel
from app.tasks.act.spec import ActSpec
from app.tasks.act.symmetries import GRID_ENV_ID
from app.tasks.base import LoadOptions, Timing
from tests.acttools import load_runner, read_act_spec, write_tiny_agent
from tests.apptools import with_limits

SHIPPED = ("dqn-cartpole", "dqn-acrobot", "dqn-grid", "dqn-cartpole-early")


@pytest.fixture
def runner(tmp_path: Path) -> ActModel:
    return load_runner(write_tiny_agent(tmp_path))


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("observations", "error", "message"),
    [
        ([], InvalidInput, "at least one observation"),
        ("1,2,3,4", InvalidInput, "at least one observation"),
        ([[0.0] * 4, [0.0] * 5], InvalidInput, "observation 1 has shape \\[5\\]"),
        ([[0.0] * 4, [[0.0] * 4]], InvalidInput, "observation 1 has shape \\[1, 4\\]"),
        ([[0.0, float("nan"), 0.0, 0.0]], InvalidInput, "observation 0 holds NaN or infinity .* index 1"),
        ([[0.0, 0.0, 0.0, float("-inf")]], InvalidInput, "observation 0 holds NaN"),
        ([[0.0, 0.0, 0.0, 1e39]], InvalidInput, "observation 0 holds NaN"),  # overflows float32
        ([[0.0, -1e6 - 0.5, 0.0, 0.0]], InvalidInput, "observation 0 holds -1000000.5 at index 1; .* at most 1e\\+06"),
        ([[0.0, "a", 0.0, 0.0]], InvalidInput, "observation 0 is not a list of numbers"),
        ([[0.0] * 4] * 9, InvalidInput, "9 observations .* limit is 8"),
    ],
)
def test_bad_requests_say_what_is_wrong(runner: ActModel, observations: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        with_limits(runner, max_observations=8).split(ActRequest(observations))  # type: ignore[arg-type]


def test_unknown_methods_are_refused(runner: ActModel) -> None:
    with pytest.raises(InvalidInput, match="method 'best'"):
        runner.split(ActRequest([[0.0] * 4], "best"))


def test_prepare_makes_one_item_per_observation_with_the_default_method(runner: ActModel) -> None:
    items = runner.split(ActRequest([[0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]]))
    assert [item.method for item in items] == [Method.EQUIZERO] * 2
    assert items[1].observation.dtype == torch.float32 and items[1].observation.tolist() == [1, 2, 3, 4]


# -- the fused pass ---------------------------------------------------------------------------------
def _items(runner: ActModel, observations: torch.Tensor, method: Method) -> list[ActItem]:
    return [ActItem(o, method) for o in observations]


def test_diagnostics_of_every_method(runner: ActModel) -> None:
    obs = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    methods = list(Method)
    items = [ActItem(o, m) for m in methods for o in obs]  # one batch mixing all four methods
    results = runner(items)
    with torch.no_grad():
        qnet_q = runner.model.head(runner.model.encoder(obs))
    for k, method in enumerate(methods):
        for i in range(3):
            result = results[k * 3 + i]
            assert not isinstance(result, BaseException)
            names = [t.name for t in result.transforms]
            weights = [t.weight for t in result.transforms]
            assert names == ["identity", "reflect"] and sum(weights) == pytest.approx(1.0)
            assert result.action == max(range(2), key=lambda a: result.q_values[a])
            assert result.transforms[0].action == int(qnet_q[i].argmax())  # the identity copy is the plain net
            assert result.transforms[0].max_q == pytest.approx(float(qnet_q[i].max()), abs=1e-6)
            assert result.lambda_net_entropy is not None and 0 <= result.lambda_net_entropy <= 0.7
            if method is Method.VANILLA:
                assert weights == [1.0, 0.0] and result.q_values == pytest.approx(qnet_q[i].tolist(), abs=1e-6)
            if method is Method.EQUITUNE:
                assert weights == [0.5, 0.5]
            if method is Method.EQUIZERO:
                best = max(result.transforms, key=lambda t: t.max_q)
                assert result.selected_transform == best.name
                assert result.action == best.action
            else:
                assert result.selected_transform is None
    # the reflected copy's choice, mapped back: reflecting the state mirrors it
    mirrored = runner(_items(runner, -obs, Method.VANILLA))
    for i in range(3):
        assert results[i].transforms[1].action == 1 - mirrored[i].transforms[0].action  # type: ignore[union-attr]


@pytest.mark.parametrize("method", [Method.EQUITUNE, Method.EQUIZERO, Method.LAMBDA])
def test_answers_are_equivariant(tmp_path: Path, method: Method) -> None:
    runner = load_runner(write_tiny_agent(tmp_path, GRID_ENV_ID))
    group = runner.model.group
    obs = torch.rand(4, group.obs_dim, generator=torch.Generator().manual_seed(2))
    base = runner(_items(runner, obs, method))
    for g in range(group.order):
        moved = runner(_items(runner, group.act(obs, g), method))
        for b, m in zip(base, moved, strict=True):
            assert not isinstance(b, BaseException) and not isinstance(m, BaseException)
            expected = group.act_q(torch.tensor(b.q_values), g)
            torch.testing.assert_close(torch.tensor(m.q_values), expected, rtol=1e-5, atol=1e-6)
            assert m.action == int(group.act_action(torch.tensor(b.action), g))


def test_an_item_gets_the_same_answer_alone_or_in_a_batch(runner: ActModel) -> None:
    obs = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    batch = runner(_items(runner, obs, Method.LAMBDA))
    alone = runner(_items(runner, obs[4:5], Method.LAMBDA))[0]
    assert batch[4].q_values == pytest.approx(alone.q_values, abs=1e-6)  # type: ignore[union-attr]


def test_one_failing_method_fails_only_its_items(runner: ActModel, monkeypatch: pytest.MonkeyPatch) -> None:
    real = runner_module.combine_q

    def broken(aligned, method, **kw):
        if method is Method.EQUITUNE:
            raise RuntimeError("boom")
        return real(aligned, method, **kw)

    monkeypatch.setattr(runner_module, "combine_q", broken)
    results = runner([ActItem(torch.zeros(4), Method.EQUITUNE), ActItem(torch.ones(4), Method.VANILLA)])
    assert isinstance(results[0], RuntimeError) and not isinstance(results[1], BaseException)


def test_respond_warmup_and_card(tmp_path: Path) -> None:
    folder = write_tiny_agent(tmp_path, "Acrobot-v1")
    model = ActModel.load(folder, read_act_spec(folder), LoadOptions(device="cpu"))
    model.warmup(8)
    request = ActRequest([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0]], "lambda")
    items = with_limits(model, max_observations=4).split(request)
    output = model.respond(request, list(model(list(map(model.prepare, items)))), Timing(0.0, 0.001, 1))
    assert (output.model, output.method, output.group, output.env) == (folder.name, Method.LAMBDA, "z2", "Acrobot-v1")
    with pytest.raises(InvalidInput, match="limit is 4"):
        with_limits(model, max_observations=4).split(ActRequest([[0.0] * 6] * 5))
    card = model.card()
    assert card["task"] == "act" and card["env"] == "Acrobot-v1" and card["group"] == "z2"
    assert card["transforms"] == ["identity", "reflect"] and card["lambda_trained"] is True
    assert card["actions"] == ["torque -1", "torque 0", "torque +1"] and card["observation_dim"] == 6


# -- the spec -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"env": "MountainCar-v0"}, "unknown environment"),
        ({"group": "c4"}, "symmetry group of CartPole-v1 is 'z2'"),
        ({"backbone": {"family": "efficientnet_lite"}}, "mlp"),
        ({"backbone": {"family": "mlp", "options": {"depth": 3}}}, "unknown backbone options"),
        ({"zero_loss": "entropy"}, "zero_loss does not apply"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_bad_specs_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    raw = {**yaml.safe_load((write_tiny_agent(tmp_path) / "model.yaml").read_text()), "name": "x", **change}
    with pytest.raises(ValidationError, match=message):
        ActSpec.model_validate(raw)


def test_weights_that_do_not_fit_name_the_file(tmp_path: Path) -> None:
    folder = write_tiny_agent(tmp_path)
    spec = read_act_spec(folder).model_copy(update={"env": "Acrobot-v1"})
    with pytest.raises(ModelLoadError, match=r"qnet\.safetensors does not fit"):
        ActModel.load(folder, spec, LoadOptions(device="cpu"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_agents_load_and_are_equivariant(name: str) -> None:
    runner = load_runner(DEFAULT_MODELS_DIR / name)
    group = runner.model.group
    obs = torch.randn(8, group.obs_dim, generator=torch.Generator().manual_seed(0))
    for method in (Method.EQUITUNE, Method.EQUIZERO, Method.LAMBDA):
        base = runner.model.predict(obs, method).output
        for g in range(group.order):
            moved = runner.model.predict(group.act(obs, g), method).output
            torch.testing.assert_close(moved, group.act_q(base, g), rtol=1e-5, atol=1e-5)
    runner.warmup(4)


def test_states_whose_q_values_overflow_are_refused_not_answered_with_inf() -> None:
    # the shipped agent (256-unit layers), without the bound on values that keeps requests from this
    huge = [[3e38, 3e38, 3e38, 3e38]]  # finite float32, far outside any CartPole state
    runner = with_limits(load_runner(DEFAULT_MODELS_DIR / "dqn-cartpole"), max_abs_value=1e39)
    with torch.no_grad():
        raw = runner.model.head(runner.model.encoder(torch.tensor(huge)))
    assert not torch.isfinite(raw).all()  # the network overflows on it: the check below can fail
    items = runner.split(ActRequest([*huge, [0.01, 0.02, 0.03, 0.04]], "lambda"))
    overflowed, fine = runner(items)
    assert isinstance(overflowed, InvalidInput) and "overflow" in str(overflowed)
    assert not isinstance(fine, BaseException) and all(np.isfinite(fine.q_values))

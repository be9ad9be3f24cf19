"""The four methods on hand-built per-copy outputs, and their special-case identities."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import app.equivariance
from app.equivariance import Method, ZeroLoss, combine, equizero_loss, lambda_entropy

# The method names, the HTTP layer and the command lines: none of them may load torch.
TORCH_FREE = ["app.equivariance", "app.api.routes", "app.api.v2", "app.server", "app.cli", "app.tasks.act.cli"]
PROBE = f"""
import sys
for name in {TORCH_FREE!r}:
    __import__(name)
from app.tasks import TASKS, task_cli, task_http, task_limits
for task in TASKS:  # every task's adapter, limits and command line, and the app with all its routes
    task_http(task), task_limits(task), task_cli(task)
from app.server import create_app
create_app().openapi()
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_method_names_the_http_layer_and_the_command_lines_import_without_torch() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_loads_its_torch_modules_on_first_use() -> None:
    assert app.equivariance.combine is combine and app.equivariance.Method is Method
    assert all(hasattr(app.equivariance, name) for name in app.equivariance.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        app.equivariance.nothing  # noqa: B018


def test_vanilla_is_the_identity_copy_bit_for_bit() -> None:
    aligned = torch.randn(4, 3, 10)
    out = combine(aligned, "vanilla")
    assert torch.equal(out.output, aligned[0])
    assert torch.equal(out.weights, torch.tensor([[1.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 3]))
    assert out.selected is None


def test_equitune_is_the_mean() -> None:
    aligned = torch.randn(4, 3, 10)
    out = combine(aligned, Method.EQUITUNE)
    torch.testing.assert_close(out.output, aligned.mean(0))
    torch.testing.assert_close(out.weights, torch.full((4, 3), 0.25))


def test_equitune_equals_lambda_with_constant_lambda() -> None:
    aligned = torch.randn(8, 5, 7)
    const = torch.full((8, 5), 3.7)
    torch.testing.assert_close(combine(aligned, "lambda", log_lambda=const).output, combine(aligned, "equitune").output)


def test_equizero_equals_lambda_with_an_indicator_lambda() -> None:
    aligned = torch.randn(4, 6, 9)
    out = combine(aligned, "equizero")
    # λ = exp(log λ): a huge gap on the selected copy makes the softmax an exact indicator.
    indicator = torch.full((4, 6), -1e4)
    indicator[out.selected, torch.arange(6)] = 0.0
    torch.testing.assert_close(out.output, combine(aligned, "lambda", log_lambda=indicator).output)
    assert torch.equal(out.weights.argmax(0), out.selected)


def test_equizero_picks_the_most_confident_copy() -> None:
    aligned = torch.zeros(3, 1, 4)
    aligned[1, 0, 2] = 5.0  # copy 1 is the most peaked
    aligned[2, 0, 0] = 1.0
    out = combine(aligned, "equizero")
    assert out.selected.tolist() == [1]
    assert torch.equal(out.output, aligned[1])


def test_equizero_losses_by_hand() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]], [[0.9, 0.05, 0.05]]]))
    neg_max = equizero_loss(logits, ZeroLoss.NEG_MAX_PROB)
    torch.testing.assert_close(neg_max, torch.tensor([[-0.5], [-0.9]]))
    entropy = equizero_loss(logits, ZeroLoss.ENTROPY)
    expected = [-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), -(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05))]
    torch.testing.assert_close(entropy, torch.tensor([[expected[0]], [expected[1]]]))


def test_the_two_losses_can_choose_differently() -> None:
    # copy 0: highest max-prob but spread tail; copy 1: lower max-prob, little entropy elsewhere
    p0 = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])
    p1 = torch.tensor([0.55, 0.45, 0.0001, 0.0001, 0.0001])
    aligned = torch.stack([p0.log(), p1.log()])[:, None, :]
    assert combine(aligned, "equizero", zero_loss="neg_max_prob").selected.item() == 0
    assert combine(aligned, "equizero", zero_loss="entropy").selected.item() == 1


def test_equizero_straight_through_gradient_is_equitunes() -> None:
    aligned = torch.randn(4, 2, 5, requires_grad=True)
    out = combine(aligned, "equizero", straight_through=True)
    torch.testing.assert_close(out.output, combine(aligned.detach(), "equizero").output)
    out.output.sum().backward()
    torch.testing.assert_close(aligned.grad, torch.full_like(aligned, 0.25))


def test_lambda_weights_are_normalised_and_positive() -> None:
    aligned = torch.randn(4, 3, 2)
    log_lambda = torch.randn(4, 3)
    out = combine(aligned, "lambda", log_lambda=log_lambda)
    torch.testing.assert_close(out.weights.sum(0), torch.ones(3))
    assert (out.weights > 0).all()
    lam = log_lambda.exp()
    expected = (lam[..., None] * aligned).sum(0) / lam.sum(0)[..., None]
    torch.testing.assert_close(out.output, expected)


def test_lambda_without_weights_is_an_error() -> None:
    with pytest.raises(ValueError, match="λ-net"):
        combine(torch.randn(2, 1, 3), "lambda")
    with pytest.raises(ValueError):
        combine(torch.randn(2, 1, 3), "bogus")


def test_lambda_entropy_bounds() -> None:
    uniform = torch.full((4, 1), 0.25)
    onehot = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    torch.testing.assert_close(lambda_entropy(uniform), torch.tensor([math.log(4)]))
    assert lambda_entropy(onehot).item() == pytest.approx(0.0, abs=1e-6)

"""The evaluation table on a hand-built case whose every number is worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from app.equivariance import image_group
from app.tasks.classify.training.evaluate import evaluate_outputs, random_elements


def test_accuracy_table_by_hand() -> None:
    c4 = image_group("c4")
    # Image 0 (label 0): only the upright copy is right, and it is the most confident one;
    # the λ-net prefers the wrong copies. Image 1 (label 2): every copy is right.
    aligned = torch.zeros(4, 2, 3)
    aligned[0, 0] = torch.tensor([2.0, 0.0, 0.0])
    aligned[1:, 0] = torch.tensor([0.0, 1.0, 0.0])
    aligned[:, 1] = torch.tensor([0.0, 0.0, 1.0])
    log_lambda = torch.tensor([[0.0, 3.0], [5.0, 0.0], [5.0, 0.0], [5.0, 0.0]])
    labels = torch.tensor([0, 2])
    report = evaluate_outputs(aligned, log_lambda, labels, c4, seed=7)

    acc = report.accuracy
    # upright: vanilla takes copy 0; equitune's mean [.5, .75, 0] says class 1; equizero picks
    # the confident copy 0 under both losses; λ puts ~all weight on the wrong copies.
    assert acc["vanilla"]["upright"] == 1.0
    assert acc["equitune"]["upright"] == 0.5
    assert acc["equizero_neg_max_prob"]["upright"] == acc["equizero_entropy"]["upright"] == 1.0
    assert acc["lambda"]["upright"] == 0.5
    # rotating image 0 by h != identity makes vanilla see a wrong copy: 1, .5, .5, .5
    assert report.per_element["vanilla"] == {"identity": 1.0, "rot90": 0.5, "rot180": 0.5, "rot270": 0.5}
    assert acc["vanilla"]["every"] == pytest.approx(0.625)
    h = random_elements(c4, 2, seed=7)
    assert acc["vanilla"]["random"] == ((h[0] == 0).float().item() + 1.0) / 2
    # the combining methods are invariant: every test set gives the same number
    for name in ("equitune", "equizero_neg_max_prob", "equizero_entropy", "lambda"):
        assert acc[name]["random"] == acc[name]["every"] == acc[name]["upright"]
        assert set(report.per_element[name].values()) == {acc[name]["upright"]}

    w0 = torch.softmax(torch.tensor([0.0, 5.0, 5.0, 5.0]), 0)
    w1 = torch.softmax(torch.tensor([3.0, 0.0, 0.0, 0.0]), 0)
    expected = ((w0 + w1) / 2).tolist()
    assert report.lambda_mean_weight == pytest.approx(dict(zip(c4.names, expected, strict=True)))
    assert report.lambda_share_upright_max == 0.5
    entropy = [-(w * w.log()).sum().item() for w in (w0, w1)]
    assert report.lambda_mean_entropy == pytest.approx(sum(entropy) / 2, rel=1e-5)
    assert report.equizero_share_upright == {"equizero_neg_max_prob": 1.0, "equizero_entropy": 1.0}
    assert math.isclose(sum(report.lambda_mean_weight.values()), 1.0, rel_tol=1e-6)


def test_uniform_lambda_is_not_on_the_upright_copy() -> None:
    report = evaluate_outputs(
        torch.randn(4, 3, 2), torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), image_group("c4")
    )
    assert report.lambda_share_upright_max == 0.0
    assert report.lambda_mean_weight == pytest.approx(dict.fromkeys(image_group("c4").names, 0.25))


def test_without_lambda_net_the_lambda_column_is_left_out() -> None:
    report = evaluate_outputs(torch.randn(8, 5, 4), None, torch.arange(5) % 4, image_group("d4"))
    assert "lambda" not in report.accuracy and report.lambda_mean_weight is None

"""train-text and evaluate-fairness on the tiny language model: the λ-net they write is served,
the fairness gap is 0 for the equivariant methods and not for vanilla, the CLI writes files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from app.cli import main
from app.tasks import load_model
from app.tasks.generate.fairness import evaluate_fairness, markdown, total_variation, write_report
from app.tasks.generate.training import load_cache, train_text_lambda
from tests.generatetools import one_thread, write_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread
PROMPTS = ["The man said", "The woman said", "He was", "She was", "The Black boy", "The White girl"]


def test_train_text_writes_a_lambda_net_the_server_loads(tmp_path: Path) -> None:
    write_tiny_lm(tmp_path)
    out, report_path, cache = tmp_path / "tinylm" / "lambda_net.safetensors", tmp_path / "r.json", tmp_path / "c"
    report = train_text_lambda(
        tmp_path, "tinylm", out=out, report=report_path, prompts=PROMPTS, samples_per_prompt=2, new_tokens=3,
        epochs=20, cache_path=cache,
    )  # fmt: skip
    assert report.copies == 4 and report.train_sequences + report.val_sequences == 12
    assert set(report.val_nll) == {"vanilla", "equitune", "equizero", "lambda"}
    # early stopping from uniform λ: never worse than equitune on the held-out prompts
    assert report.val_nll["lambda"] <= report.val_nll["equitune"] + 1e-6
    assert json.loads(report_path.read_text())["val_nll"] == pytest.approx(report.val_nll)
    assert load_cache(cache).features.shape[:2] == (4, 12)
    again = train_text_lambda(
        tmp_path, "tinylm", out=tmp_path / "again.safetensors", prompts=PROMPTS, samples_per_prompt=2, new_tokens=3,
        epochs=20, cache_path=cache,
    )  # fmt: skip
    assert again.val_nll == pytest.approx(report.val_nll) and "cache_s" not in again.seconds

    spec = yaml.safe_load((tmp_path / "tinylm" / "model.yaml").read_text())
    (tmp_path / "tinylm" / "model.yaml").write_text(yaml.safe_dump({**spec, "lambda_net": "lambda_net.safetensors"}))
    model = load_model(tmp_path, "tinylm", "cpu")
    # early stopping may keep the uniform start (best epoch 0): the card must say so, not claim training
    assert model.lambda_trained == (report.history[-1]["best_epoch"] > 0)
    assert model.lambda_net.mlp[0].in_features == 64


def test_fairness_gap_is_zero_for_equivariant_methods(tmp_path: Path) -> None:
    write_tiny_lm(tmp_path, group="gender")
    report = evaluate_fairness(
        tmp_path, "tinylm", samples=1, max_new_tokens=3, methods=("vanilla", "equitune", "equizero", "λ-equitune"),
        sample_methods=None,
    )  # fmt: skip
    assert set(report.results) == {"vanilla", "equitune", "equizero", "λ-equitune"}
    assert report.results["vanilla"]["gender"].next_token_tv_mean > 1e-3
    for row in ("equitune", "equizero", "λ-equitune"):
        result = report.results[row]["gender"]
        assert result.next_token_tv_max < 1e-5, row
        assert result.swap_consistent == 1.0, row
    table = markdown(report)
    assert "| method | gender (man / woman) |" in table and "| equitune |" in table
    json_path, md_path = write_report(report, tmp_path / "out" / "fairness")
    assert json.loads(json_path.read_text())["results"]["equitune"]["gender"]["swap_consistent"] == 1.0
    assert md_path.read_text() == table


def test_total_variation_of_word_counts() -> None:
    from collections import Counter

    assert total_variation(Counter(a=2), Counter(a=5)) == 0
    assert total_variation(Counter(a=1), Counter(b=1)) == 1
    assert total_variation(Counter(a=1, b=1), Counter(a=1)) == pytest.approx(0.5)
    assert total_variation(Counter(), Counter(a=1)) is None


def test_cli_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_lm(tmp_path, group="race")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The Black boy said\nThe White boy said\n\nShe was\n")
    threads = torch.get_num_threads()
    code = main(["train-text", "--model", "tinylm", "--models-dir", str(tmp_path), "--prompts", str(prompts),
                 "--samples-per-prompt", "1", "--new-tokens", "2", "--epochs", "3", "--threads", "1"])  # fmt: skip
    torch.set_num_threads(threads)
    assert code == 0 and (tmp_path / "tinylm" / "lambda_net.safetensors").exists()
    assert "held-out NLL" in capsys.readouterr().out
    out = tmp_path / "fair"
    code = main(["evaluate-fairness", "--model", "tinylm", "--models-dir", str(tmp_path), "--samples", "1",
                 "--max-new-tokens", "2", "--methods", "vanilla", "equizero", "--out", str(out)])  # fmt: skip
    assert code == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["results"]) == {"vanilla", "equizero"} and set(data["results"]["equizero"]) == {"race"}
    equizero = data["results"]["equizero"]["race"]  # not in the sampled rows by default: the next-token gap only
    assert equizero["swap_consistent"] is None and equizero["next_token_tv_max"] < 1e-5
    assert data["results"]["vanilla"]["race"]["swap_consistent"] is not None
    assert data["command"].startswith("python -m app evaluate-fairness --model tinylm")
    assert "race (Black person / White person)" in out.with_suffix(".md").read_text()

"""SCAN training: the held-out part, the methods' losses (equizero straight-through), tiny pretraining and
fine-tuning runs, and ``train-scan`` writing entries that the runner serves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from app.equivariance import Method
from app.equivariance.sequence import teacher_forced_copies
from app.tasks.translate import cli as scan_cli
from app.tasks.translate.groups import scan_group
from app.tasks.translate.messages import TranslateRequest
from app.tasks.translate.scan import split
from app.tasks.translate.training import (
    FinetuneConfig,
    PretrainConfig,
    encode_pairs,
    finetune,
    held_out_split,
    method_loss,
    oversample_short,
    pretrain,
    uniform_lambda_net,
)
from app.tasks.translate.vocab import ACTION_EOS, ACTION_PAD, ACTION_SOS
from tests.translatetools import load_runner, one_thread, tiny_seq2seq  # noqa: F401 - one_thread is a fixture

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"steps": 12, "batch_size": 16, "hidden": 8, "held_out": 0.005, "eval_every": 6}


def test_the_held_out_part_is_fixed_disjoint_and_keeps_the_bare_jump() -> None:
    train, held = held_out_split("add_jump", 0.1)
    assert held_out_split("add_jump", 0.1) == (train, held)  # the same for every seed
    assert not {c for c, _ in train} & {c for c, _ in held}
    assert sum(c == "jump" for c, _ in train) == 1467 and all(c != "jump" for c, _ in held)
    assert len(held) == round(0.1 * 13203) and len(train) + len(held) == len(split("add_jump").train)


def test_short_commands_are_repeated_to_the_given_count_and_longer_ones_left_alone() -> None:
    pairs = [("walk", "I_WALK"), ("jump", "I_JUMP"), ("jump", "I_JUMP"), ("jump", "I_JUMP")]
    pairs += [("run twice", "I_RUN I_RUN"), ("look and walk", "I_LOOK I_WALK"), ("walk left twice", "x")]
    counts = {c: sum(c == d for d, _ in oversample_short(pairs, 2, 3)) for c, _ in pairs}
    assert counts == {"walk": 3, "jump": 3, "run twice": 3, "look and walk": 1, "walk left twice": 1}
    assert oversample_short(pairs, 3, 1) == pairs
    assert oversample_short(pairs, 3, 1) is not pairs
    train, _ = held_out_split("add_jump", 0.1)
    many = oversample_short(train, 3, 20)
    assert sum(c == "jump" for c, _ in many) == 1467  # already repeated more: kept as it is
    assert sum(c == "walk" for c, _ in many) == 20 and many[: len(train)] == train


def test_batches_hold_start_and_end_tokens() -> None:
    batch = encode_pairs([("jump twice", "I_JUMP I_JUMP"), ("walk", "I_WALK")])
    assert batch.src.shape == (2, 2) and batch.tgt_in.shape == batch.tgt_out.shape == (2, 3)
    assert batch.tgt_in[:, 0].tolist() == [ACTION_SOS] * 2
    assert batch.tgt_out[0, 2] == ACTION_EOS and batch.tgt_out[1].tolist()[1:] == [ACTION_EOS, ACTION_PAD]


def test_equizero_trains_on_the_most_confident_copy_with_equitunes_gradient() -> None:
    model, group = tiny_seq2seq(), scan_group("verb4")
    batch = encode_pairs([("jump twice after walk left", "I_TURN_LEFT I_WALK I_JUMP I_JUMP")])
    copies = teacher_forced_copies(model, group, batch.src, batch.tgt_in)
    nll = [
        torch.nn.functional.nll_loss(copies.aligned[g, 0], batch.tgt_out[0]) for g in range(group.order)
    ]  # each copy's loss
    confidence = copies.aligned[:, 0].exp().amax(-1).mean(-1)  # mean max-probability per copy
    loss = method_loss(model, group, batch, Method.EQUIZERO)
    assert float(loss.detach()) == pytest.approx(float(nll[int(confidence.argmax())].detach()), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)
    for method in Method:
        lam = uniform_lambda_net(model.feature_dim) if method is Method.LAMBDA else None
        assert torch.isfinite(method_loss(model, group, batch, method, lam))


def test_tiny_pretraining_and_fine_tuning_runs() -> None:
    result = pretrain(PretrainConfig(split="around_right", cell="lstm", **TINY), progress=False)
    assert [c["step"] for c in result.curve] == [6, 12] and result.best_step in (6, 12)
    assert 0 <= result.held_out_accuracy <= 1
    frozen = finetune(
        result.model,
        FinetuneConfig(Method.LAMBDA, "direction", "around_right", steps=3, freeze_model=True),
        progress=False,
        evaluate=False,
    )
    assert all(torch.equal(a, b) for a, b in zip(frozen.model.parameters(), result.model.parameters(), strict=True))
    assert frozen.lambda_net is not None and not frozen.lambda_net.is_constant  # trained away from uniform
    for method in (Method.VANILLA, Method.EQUITUNE, Method.EQUIZERO):
        tuned = finetune(
            result.model, FinetuneConfig(method, "direction", "around_right", steps=2), progress=False, evaluate=False
        )
        assert not all(
            torch.equal(a, b) for a, b in zip(tuned.model.parameters(), result.model.parameters(), strict=True)
        )
    with pytest.raises(ValueError, match="λ-net alone"):
        finetune(result.model, FinetuneConfig(Method.EQUITUNE, "direction", freeze_model=True), progress=False)


def test_train_scan_writes_entries_the_runner_serves(tmp_path: Path) -> None:
    argv = ["train-scan", "--split", "add_jump", "--cell", "gru", "--seeds", "0", "1", "--lambda-steps", "2"]
    argv += ["--models-dir", str(tmp_path), "--quiet"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert scan_cli.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan-gru-addjump", "scan-gru-addjump-verb"]
    spec = yaml.safe_load((tmp_path / "scan-gru-addjump" / "model.yaml").read_text())
    assert spec["group"] == "verb4" and spec["lambda_net"] == "lambda_net.safetensors"
    assert set(spec["training"]["seeds"]) == {0, 1} and spec["training"]["pretrain"]["steps"] == 12
    for name, group in (("scan-gru-addjump", "verb4"), ("scan-gru-addjump-verb", "verb")):
        runner = load_runner(tmp_path / name)
        assert runner.spec.group == group and runner.lambda_trained
        result = runner(runner.split(TranslateRequest(["jump twice"], "lambda")))[0]
        assert not isinstance(result, BaseException)


@pytest.mark.slow
def test_the_experiment_runs_end_to_end(tmp_path: Path) -> None:
    """bench/scan_experiment.py with the tiniest settings: the table and the exported entries appear."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    args = ["--splits", "around_right", "--cells", "gru", "--seeds", "0", "--steps", "4", "--finetune-steps", "2"]
    args += ["--lambda-steps", "2", "--limit", "10", "--work-dir", str(tmp_path / "work"), "--quiet"]
    args += ["--out", str(tmp_path / "table"), "--export-models", "--models-dir", str(tmp_path / "models")]
    done = subprocess.run(
        [sys.executable, "bench/scan_experiment.py", *args], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "table.json").read_text())
    assert report["ceilings"]["around_right"]["direction"] == pytest.approx(0.839, abs=5e-4)
    stages = {(e["stage"], e["method"]) for e in report["aggregate"]}
    assert stages == {
        (s, m) for s in ("zero-shot", "fine-tuned") for m in ("vanilla", "equitune", "equizero", "lambda")
    }
    assert "Around Right" in (tmp_path / "table.md").read_text()
    assert report["exported"] == ["scan-gru-aroundright"]
    assert load_runner(tmp_path / "models" / "scan-gru-aroundright").lambda_trained

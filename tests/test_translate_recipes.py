"""SCAN fine-tuning recipes (issue 26): the paper's per-copy log-probability average, equizero's
selected-copy loss, the mixture, free-running copies, group augmentation and early stopping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.equivariance import Method
from app.equivariance.sequence import teacher_forced_copies
from app.tasks.translate import cli as scan_cli
from app.tasks.translate.groups import scan_group
from app.tasks.translate.seq2seq import CELLS
from app.tasks.translate.training import (
    PAPER_LEARNING_RATES,
    CopyLoss,
    FinetuneConfig,
    Objective,
    _augmented,
    encode_pairs,
    finetune,
    free_running,
    free_running_copies,
    method_loss,
    recipe,
)
from app.tasks.translate.vocab import ACTION_EOS, ACTION_PAD, ACTION_SOS
from tests.translatetools import one_thread, tiny_seq2seq  # noqa: F401 - one_thread is a fixture

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    ("jump twice after walk left", "I_TURN_LEFT I_WALK I_JUMP I_JUMP"),
    ("run left", "I_TURN_LEFT I_RUN"),
    ("look right twice", "I_TURN_RIGHT I_LOOK I_TURN_RIGHT I_LOOK"),
]
TINY = {"steps": 4, "eval_every": 0, "held_out": 0.005, "batch_size": 4}


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_selected_copy_loss_sends_the_gradient_to_the_selected_copy_only() -> None:
    model, group = tiny_seq2seq(), scan_group("direction")
    batch = encode_pairs(PAIRS)
    copies = teacher_forced_copies(model, group, batch.src, batch.tgt_in)
    aligned = copies.aligned.detach().requires_grad_(True)
    confidence = aligned.detach().masked_fill((batch.tgt_out == ACTION_PAD).view(1, 3, -1, 1), 0.0)
    selected = confidence.exp().amax(-1).mean(-1).argmax(0)  # [B]: the most confident copy of each pair

    class Frozen(torch.nn.Module):  # feeds the fixed copies to method_loss through teacher_forced
        def teacher_forced(self, src: torch.Tensor, tgt_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rows = group.output.invert_scores(aligned)  # invert is its own inverse for an order-2 group
            return rows.flatten(0, 1), copies.features.flatten(0, 1).detach()

    loss = method_loss(Frozen(), group, batch, Method.EQUIZERO, objective=Objective(CopyLoss.SELECTED_COPY))
    loss.backward()
    assert aligned.grad is not None
    per_copy = aligned.grad.abs().sum(dim=(2, 3))  # [n, B]
    for b in range(3):
        assert per_copy[selected[b], b] > 0
        assert all(per_copy[g, b] == 0 for g in range(group.order) if g != selected[b])


def test_under_the_paper_average_equizero_steps_as_equitune_and_the_selected_copy_loss_does_not() -> None:
    """The paper's straight-through equizero has equitune's gradient at every scored position: without the
    stop at the predicted end, both fine-tune to the same weights. The selected-copy loss must not."""
    pretrained, group = tiny_seq2seq(seed=3), "direction"
    common = {**TINY, "copy_loss": CopyLoss.MEAN_LOG_PROB, "split": "around_right"}
    equitune = finetune(pretrained, FinetuneConfig(Method.EQUITUNE, group, **common), progress=False, evaluate=False)
    equizero = finetune(pretrained, FinetuneConfig(Method.EQUIZERO, group, **common), progress=False, evaluate=False)
    assert same(weights(equitune.model), weights(equizero.model))
    common["copy_loss"] = CopyLoss.SELECTED_COPY
    selected = finetune(pretrained, FinetuneConfig(Method.EQUIZERO, group, **common), progress=False, evaluate=False)
    assert not same(weights(equitune.model), weights(selected.model))
    assert not same(weights(pretrained), weights(selected.model))


def test_equizero_fine_tuning_never_gives_equitunes_weights() -> None:
    """The recipe the tables call equizero fine-tuning (``selected``), as it runs for a few steps: its
    weights are not equitune's (under the straight-through recipes they were, bit for bit)."""
    pretrained = tiny_seq2seq(seed=4)
    tuned = {
        method: finetune(
            pretrained, recipe("selected", method, "direction", "around_right", 0, **TINY), progress=False
        ).model
        for method in (Method.EQUITUNE, Method.EQUIZERO)
    }
    assert not same(weights(tuned[Method.EQUITUNE]), weights(tuned[Method.EQUIZERO]))
    straight_through = {
        method: finetune(
            pretrained, recipe("mixture", method, "direction", "around_right", 0, **TINY), progress=False
        ).model
        for method in (Method.EQUITUNE, Method.EQUIZERO)
    }
    assert same(weights(straight_through[Method.EQUITUNE]), weights(straight_through[Method.EQUIZERO]))


def test_free_running_rows_are_fed_their_own_greedy_tokens() -> None:
    model = tiny_seq2seq(seed=1)
    src = encode_pairs(PAIRS).src
    log_probs, features = free_running(model, src, 6)
    chosen = log_probs.argmax(-1)
    tgt_in = torch.cat([torch.full((3, 1), ACTION_SOS), chosen[:, :-1]], dim=1)
    forced, forced_features = model.teacher_forced(src, tgt_in)
    for row in range(3):
        ends = (chosen[row] == ACTION_EOS).nonzero()
        stop = int(ends[0]) + 1 if len(ends) else 6
        torch.testing.assert_close(log_probs[row, :stop], forced[row, :stop], rtol=1e-5, atol=1e-6)
        assert torch.all(log_probs[row, stop:] == 0)  # after its end: zeros, as the paper's buffer
    torch.testing.assert_close(features, forced_features)
    group = scan_group("direction")
    copies = free_running_copies(model, group, src, 6)
    assert copies.aligned.shape == (2, 3, 6, log_probs.shape[-1])
    torch.testing.assert_close(copies.aligned[0], log_probs)  # copy 0 is the identity


def test_augmentation_replaces_each_pair_by_one_of_its_copies() -> None:
    group = scan_group("direction")
    batch = encode_pairs(PAIRS * 20)
    augmented = _augmented(group, batch, torch.Generator().manual_seed(0))
    src_copies = group.input.expand(batch.src).view(2, 60, -1)
    tgt_copies = group.output.expand(batch.tgt_out).view(2, 60, -1)
    picked = [
        next(g for g in range(2) if torch.equal(augmented.src[i], src_copies[g, i])) for i in range(60)
    ]  # raises StopIteration if a row is no copy at all
    assert set(picked) == {0, 1}  # both elements drawn
    assert all(torch.equal(augmented.tgt_out[i], tgt_copies[picked[i], i]) for i in range(60))
    with pytest.raises(ValueError, match="vanilla"):
        method_loss(tiny_seq2seq(), group, batch, Method.EQUITUNE, objective=Objective(augment=True))


def test_the_paper_loss_stops_at_the_first_predicted_end_and_sums_per_sequence() -> None:
    model, group = tiny_seq2seq(seed=2), scan_group("direction")
    batch = encode_pairs(PAIRS)
    with torch.no_grad():
        model.out.bias[ACTION_EOS] += 50.0  # every position predicts the end: only the first is scored
    copies = teacher_forced_copies(model, group, batch.src, batch.tgt_in)
    mean = copies.aligned.detach().mean(0)
    first = -mean[torch.arange(3), 0, batch.tgt_out[:, 0]]
    paper = Objective(CopyLoss.MEAN_LOG_PROB, stop_at_predicted_eos=True, token_sum=True)
    loss = method_loss(model.eval(), group, batch, Method.EQUITUNE, objective=paper)
    assert float(loss.detach()) == pytest.approx(float(first.sum() / 3), rel=1e-5)


def test_recipes_are_the_papers_schedule_and_ours() -> None:
    paper = recipe("paper", Method.EQUIZERO, "direction", "around_right", 1)
    assert (paper.steps, paper.batch_size, paper.teacher_forcing, paper.weight_decay) == (10_000, 1, 0.5, 1e-4)
    assert paper.learning_rate == PAPER_LEARNING_RATES["around_right"] == 2e-5 and paper.eval_every > 0
    assert recipe("paper", Method.EQUIZERO, "verb", "add_jump", 1).learning_rate == 5e-5
    assert recipe("selected", Method.EQUIZERO, "direction", "around_right", 1).copy_loss is CopyLoss.SELECTED_COPY
    assert recipe("augmented", Method.VANILLA, "direction", "around_right", 1).augment
    assert recipe("mixture", Method.EQUIZERO, "direction", "around_right", 1).copy_loss is CopyLoss.LOG_MEAN_EXP
    with pytest.raises(ValueError, match="equizero"):
        method_loss(
            tiny_seq2seq(),
            scan_group("direction"),
            encode_pairs(PAIRS),
            Method.EQUITUNE,
            objective=Objective(CopyLoss.SELECTED_COPY),
        )


def test_early_stopping_keeps_the_best_held_out_checkpoint() -> None:
    pretrained = tiny_seq2seq(seed=5)
    config = FinetuneConfig(
        Method.EQUITUNE, "direction", "around_right", steps=6, batch_size=4, held_out=0.005, eval_every=3
    )
    result = finetune(pretrained, config, progress=False, curve_sets={"probe": PAIRS})
    points = {p["step"]: p for p in result.curve}
    assert sorted(points) == [3, 6]
    assert result.held_out_accuracy == max(p["held_out_accuracy"] for p in result.curve)
    assert result.best_step == max(points, key=lambda s: (points[s]["held_out_accuracy"], -s))
    curved = FinetuneConfig(
        Method.EQUITUNE, "direction", "around_right", steps=4, batch_size=4, held_out=0.005, curve_steps=(2, 4)
    )
    curve = finetune(pretrained, curved, progress=False, curve_sets={"probe": PAIRS}).curve
    assert [p["step"] for p in curve] == [2, 4] and all(0 <= p["probe_accuracy"] <= 1 for p in curve)


def test_the_command_line_offers_every_cell() -> None:
    assert scan_cli.TRAINABLE_CELLS == CELLS and "rnn" in CELLS


@pytest.mark.slow
def test_the_fine_tuning_experiment_runs_end_to_end(tmp_path: Path) -> None:
    """bench/scan_finetune_experiment.py with the tiniest settings: every run's rows, the paired
    comparisons and the curves appear, and a second invocation reads the cache instead of training."""
    root = Path(__file__).resolve().parent.parent
    args = ["--cells", "rnn", "--seeds", "0", "1", "--pretrain-steps", "4", "--steps", "6", "--limit", "12"]
    args += ["--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "table"), "--quiet"]
    args += ["--runs", "paper:equitune", "selected:equizero", "augmented:vanilla"]
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "bench/scan_finetune_experiment.py", *args],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "table.json").read_text())
    rows = {(e["stage"], e["method"], e["evaluated_as"]): e for e in report["aggregate"]}
    assert set(rows) == {("zero-shot", m, m) for m in ("vanilla", "equitune", "equizero")} | {
        ("paper", "equitune", "equitune"),
        ("selected", "equizero", "equizero"),
    } | {("augmented", "vanilla", m) for m in ("vanilla", "equitune", "equizero")}
    assert all(e["test"]["n"] == 2 and e["seeds"] == [0, 1] for e in rows.values())
    comparisons = {c["comparison"]: c for c in report["paired"]}
    # only the comparison whose both rows ran; its differences are per seed
    assert set(comparisons) == {"equitune fine-tuned − augmented vanilla decoded as equitune"}
    assert len(next(iter(comparisons.values()))["per_seed"]) == 2
    assert report["duration_s"] < 60  # the second invocation: everything from the cache
    assert "Paired differences" in (tmp_path / "table.md").read_text()

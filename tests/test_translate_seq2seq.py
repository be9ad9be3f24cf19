"""The GRU/LSTM/RNN encoder-decoder: stepping equals the teacher-forced pass, padding changes nothing,
sizes are read back from the weights."""

from __future__ import annotations

import pytest
import torch

from app.tasks.translate.seq2seq import Seq2Seq, Seq2SeqConfig, state_dict_config
from app.tasks.translate.vocab import ACTION_SOS, ACTIONS_VOCAB, COMMAND_PAD, COMMANDS
from tests.translatetools import one_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cell: str, seed: int = 0, bidirectional: bool = True) -> Seq2Seq:
    torch.manual_seed(seed)
    return Seq2Seq(Seq2SeqConfig(cell=cell, hidden=12, bidirectional=bidirectional)).eval()  # type: ignore[arg-type]


def commands() -> torch.Tensor:
    rows = [["jump", "twice", "after", "walk", "left"], ["turn", "right"], ["run", "around", "left", "thrice"]]
    ids = torch.full((len(rows), 7), COMMAND_PAD, dtype=torch.long)  # wider than any: trailing padding
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(COMMANDS.encode(row))
    return ids


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_stepping_computes_the_teacher_forced_pass(cell: str) -> None:
    model, src = tiny(cell), commands()
    tgt_in = torch.randint(3, len(ACTIONS_VOCAB), (src.shape[0], 6))
    tgt_in[:, 0] = ACTION_SOS
    forced, features = model.teacher_forced(src, tgt_in)
    state, features_again = model.begin(src)
    steps = []
    for t in range(tgt_in.shape[1]):
        log_probs, state = model.step(tgt_in[:, t], state)
        steps.append(log_probs)
    torch.testing.assert_close(torch.stack(steps, 1), forced, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features, features_again)
    assert features.shape == (3, model.feature_dim) == (3, 24)
    assert torch.allclose(forced.exp().sum(-1), torch.ones(3, 6))


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_padding_and_other_rows_change_nothing(cell: str, bidirectional: bool) -> None:
    model, src = tiny(cell, 1, bidirectional), commands()
    tokens = torch.full((3,), ACTION_SOS)
    batched, _ = model.step(tokens, model.begin(src)[0])
    for i in range(3):
        length = int((src[i] != COMMAND_PAD).sum())
        alone, _ = model.step(tokens[:1], model.begin(src[i : i + 1, :length])[0])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_dropout_is_active_in_training_only() -> None:
    model, src = tiny("gru"), commands()
    tgt_in = torch.full((3, 4), ACTION_SOS)
    model.train()
    a, _ = model.teacher_forced(src, tgt_in)
    b, _ = model.teacher_forced(src, tgt_in)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model.teacher_forced(src, tgt_in)[0], model.teacher_forced(src, tgt_in)[0])


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_sizes_are_read_back_from_the_weights(cell: str) -> None:
    model = tiny(cell, bidirectional=False)
    config = state_dict_config(model.state_dict(), cell)  # type: ignore[arg-type]
    assert config == model.config
    Seq2Seq(config).load_state_dict(model.state_dict())


def test_unknown_cells_are_refused() -> None:
    with pytest.raises(ValueError, match="cell"):
        Seq2SeqConfig(cell="transformer")  # type: ignore[arg-type]

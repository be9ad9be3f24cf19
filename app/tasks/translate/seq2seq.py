"""A GRU/LSTM/RNN encoder-decoder with dot-product attention, in pure torch (the paper's SCAN setup).

Hidden size 64, a bidirectional one-layer encoder, a one-layer decoder with Luong's dot-product
attention over the encoder states, dropout 0.1 on the embeddings and before the output layer:

    encoder   e_1..e_L = BiRNN(Emb(x))                              [L, 2H]
              m_l = W_m e_l                                         memory [L, H]
              s_0 = tanh(W_s [h_fwd; h_bwd])                        (LSTM: the cell too)
    decoder   s_t = RNN(Emb(y_{t-1}), s_{t-1})
              α_t = softmax_l(s_t · m_l)     c_t = Σ_l α_tl m_l
              p(y_t | x, y_<t) = softmax(W_o tanh(W_c [s_t; c_t]))

The decoder does not feed the context back into its recurrence, so a teacher-forced pass runs
the decoder RNN over the whole target in one call (fast training on a CPU) and ``step`` (one token
for every row, greedy decoding) computes exactly the same function. ``begin``/``step``/``teacher_forced``
are the ``app.equivariance.sequence.StepModel`` the equivariant decoder drives; the λ-net reads
``features``: the final forward and backward encoder states ``[h_fwd; h_bwd]`` (``2H``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .vocab import ACTIONS_VOCAB, COMMAND_PAD, COMMANDS

Cell = Literal["gru", "lstm", "rnn"]
CELLS: tuple[str, ...] = ("gru", "lstm", "rnn")  # rnn: Elman (tanh), the paper's default cell
RECURRENT: dict[str, type[nn.RNNBase]] = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


@dataclass(frozen=True)
class Seq2SeqConfig:
    cell: Cell = "gru"
    hidden: int = 64
    bidirectional: bool = True
    dropout: float = 0.1
    input_size: int = len(COMMANDS)
    output_size: int = len(ACTIONS_VOCAB)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose from {list(CELLS)}")
        if self.hidden < 1 or not 0 <= self.dropout < 1:
            raise ValueError("hidden must be positive and dropout in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def feature_dim(self) -> int:
        return self.hidden * (2 if self.bidirectional else 1)


@dataclass(frozen=True)
class DecoderState:
    hidden: Tensor  # [1, R, H]
    cell: Tensor | None  # [1, R, H] for an LSTM
    memory: Tensor  # [R, L, H]
    mask: Tensor  # [R, L] True on real tokens


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or Seq2SeqConfig()
        h, rnn = config.hidden, RECURRENT[config.cell]
        self.src_embedding = nn.Embedding(config.input_size, h, padding_idx=COMMAND_PAD)
        self.encoder = rnn(h, h, num_layers=1, batch_first=True, bidirectional=config.bidirectional)
        self.to_memory = nn.Linear(config.feature_dim, h, bias=False)
        self.to_hidden = nn.Linear(config.feature_dim, h)
        self.to_cell = nn.Linear(config.feature_dim, h) if config.cell == "lstm" else None
        self.tgt_embedding = nn.Embedding(config.output_size, h)
        self.decoder = rnn(h, h, num_layers=1, batch_first=True)
        self.combine = nn.Linear(2 * h, h)
        self.out = nn.Linear(h, config.output_size)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    # -- encoder ---------------------------------------------------------------------------------
    def begin(self, src: Tensor) -> tuple[DecoderState, Tensor]:
        """Right-padded command ids ``[R, L]`` -> (the decoder's start state, features ``[R, 2H]``)."""
        mask = src != COMMAND_PAD
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = pack_padded_sequence(
            self.dropout(self.src_embedding(src)), lengths, batch_first=True, enforce_sorted=False
        )
        outputs, final = self.encoder(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=src.shape[1])
        h_n = final[0] if isinstance(final, tuple) else final  # [directions, R, H]
        features = torch.cat(list(h_n), dim=-1)  # [R, 2H]: the last state of each direction
        hidden = torch.tanh(self.to_hidden(features)).unsqueeze(0)
        cell = torch.tanh(self.to_cell(features)).unsqueeze(0) if self.to_cell is not None else None
        return DecoderState(hidden, cell, self.to_memory(outputs), mask), features

    # -- decoder ---------------------------------------------------------------------------------
    def _run_decoder(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """Decoder inputs ``[R, T]`` -> log-probabilities ``[R, T, V]`` and the state after them."""
        embedded = self.dropout(self.tgt_embedding(tokens))
        if state.cell is not None:
            outputs, (hidden, cell) = self.decoder(embedded, (state.hidden, state.cell))
        else:
            outputs, hidden = self.decoder(embedded, state.hidden)
            cell = None
        scores = outputs @ state.memory.transpose(1, 2)  # [R, T, L]
        scores = scores.masked_fill(~state.mask.unsqueeze(1), float("-inf"))
        context = torch.softmax(scores, dim=-1) @ state.memory  # [R, T, H]
        mixed = self.dropout(torch.tanh(self.combine(torch.cat([outputs, context], dim=-1))))
        log_probs = torch.log_softmax(self.out(mixed), dim=-1)
        return log_probs, DecoderState(hidden, cell, state.memory, state.mask)

    def step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """One decoder step for every row: previous tokens ``[R]`` -> log-probabilities ``[R, V]``."""
        log_probs, state = self._run_decoder(tokens.unsqueeze(1), state)
        return log_probs.squeeze(1), state

    def teacher_forced(self, src: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Commands ``[R, L]`` and decoder inputs ``[R, T]`` (start token, then the gold actions)
        -> (log-probabilities ``[R, T, V]``, features ``[R, 2H]``)."""
        state, features = self.begin(src)
        log_probs, _ = self._run_decoder(tgt_in, state)
        return log_probs, features


def state_dict_config(state: dict[str, Tensor], cell: Cell, dropout: float = 0.1) -> Seq2SeqConfig:
    """The config that saved ``state`` (sizes read from its tensors), for loading."""
    hidden = int(state["src_embedding.weight"].shape[1])
    return Seq2SeqConfig(
        cell=cell,
        hidden=hidden,
        bidirectional="encoder.weight_hh_l0_reverse" in state,
        dropout=dropout,
        input_size=int(state["src_embedding.weight"].shape[0]),
        output_size=int(state["out.weight"].shape[0]),
    )

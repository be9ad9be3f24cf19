"""The two vocabularies of SCAN: command words in, actions out, each with its special tokens first.

Ids are fixed by the order here (the shipped weights depend on it). Special tokens come first so
that every group fixes them: a swap acts on words and actions, never on padding or end of sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PAD = "<pad>"
SOS = "<sos>"
EOS = "<eos>"

# The 13 words of SCAN's grammar.
COMMAND_WORDS: tuple[str, ...] = (
    "walk", "look", "run", "jump", "turn", "left", "right", "opposite", "around", "twice", "thrice", "and", "after",
)  # fmt: skip
# The 6 actions.
ACTIONS: tuple[str, ...] = ("I_WALK", "I_LOOK", "I_RUN", "I_JUMP", "I_TURN_LEFT", "I_TURN_RIGHT")


class UnknownToken(KeyError):
    """A token outside the vocabulary; ``token`` and ``position`` name it."""

    def __init__(self, token: str, position: int, known: Sequence[str]) -> None:
        super().__init__(token)
        self.token = token
        self.position = position
        self.known = tuple(known)

    def __str__(self) -> str:
        return f"unknown token {self.token!r} at position {self.position}; known: {' '.join(self.known)}"


@dataclass(frozen=True)
class Vocabulary:
    """Specials, then ``tokens``; ``ids`` maps a token to its id."""

    specials: tuple[str, ...]
    tokens: tuple[str, ...]
    ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        everything = self.specials + self.tokens
        if len(set(everything)) != len(everything):
            raise ValueError("a token is listed twice")
        object.__setattr__(self, "ids", {t: i for i, t in enumerate(everything)})

    def __len__(self) -> int:
        return len(self.specials) + len(self.tokens)

    @property
    def all_tokens(self) -> tuple[str, ...]:
        return self.specials + self.tokens

    def id(self, token: str) -> int:
        return self.ids[token]

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``; ``UnknownToken`` for a token that is not a (non-special) token here."""
        out = []
        for position, token in enumerate(tokens):
            index = self.ids.get(token)
            if index is None or index < len(self.specials):
                raise UnknownToken(token, position, self.tokens)
            out.append(index)
        return out

    def decode(self, ids: Iterable[int]) -> list[str]:
        everything = self.all_tokens
        return [everything[i] for i in ids]


COMMANDS = Vocabulary((PAD,), COMMAND_WORDS)
ACTIONS_VOCAB = Vocabulary((PAD, SOS, EOS), ACTIONS)
COMMAND_PAD = COMMANDS.id(PAD)
ACTION_PAD, ACTION_SOS, ACTION_EOS = (ACTIONS_VOCAB.id(t) for t in (PAD, SOS, EOS))

"""SCAN (Lake & Baroni, ICML 2018) generated from its grammar, offline: every command with its actions.

The grammar (their Figure 6) and its meaning, which we build side by side::

    C -> S and S | S after S | S          "x and y" = x y;   "x after y" = y x
    S -> V twice | V thrice | V           x twice = x x;     x thrice = x x x
    V -> D[1] opposite D[2] | D[1] around D[2] | D | U
    D -> U left | U right | turn left | turn right
    U -> walk | look | run | jump

``u left`` is ``I_TURN_LEFT u``; ``u opposite left`` turns twice first (``I_TURN_LEFT I_TURN_LEFT u``);
``u around left`` is ``I_TURN_LEFT u`` four times; with ``turn`` instead of a primitive only the turns
remain. That gives 34 V, 102 S and 102 + 2·102² = 20,910 commands, each with exactly one action sequence.

Splits (the files of github.com/brendenlake/SCAN, reproduced as sets):

* ``add_jump`` ("addprim_jump", Lake & Baroni): test = every command that contains ``jump``, except
  ``jump`` alone; train = every other command once, plus the pair ``jump -> I_JUMP`` repeated so that it
  makes up one tenth of the training file: ``13,203 / 9 = 1,467`` copies, the reference file's count
  (14,670 lines). The reference file is shuffled; ours lists the other pairs in grammar order and then the
  copies (training shuffles anyway).
* ``around_right`` ("template_around_right", Loula et al., 2018): test = commands with ``<primitive> around
  right`` (``walk/look/run/jump around right``) and no ``turn around right``; train = commands without
  ``around right`` at all. Commands with ``turn around right`` but no primitive around right are in
  neither file (1,209 commands), as in the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product

PRIMITIVES: dict[str, str] = {"walk": "I_WALK", "look": "I_LOOK", "run": "I_RUN", "jump": "I_JUMP"}
TURNS: dict[str, str] = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}
SPLITS: tuple[str, ...] = ("add_jump", "around_right")
ADD_JUMP_PRIMITIVE_SHARE = 10  # the bare "jump" pair is 1/10 of Add Jump's training file

Pair = tuple[str, str]  # (command, actions), space-separated words and actions as in SCAN's files


def _phrases() -> list[tuple[str, list[str]]]:
    """Every V with its actions (as lists of action tokens)."""
    verbs: list[tuple[str, list[str]]] = []
    primitives = [(word, [action]) for word, action in PRIMITIVES.items()]
    movers = [*primitives, ("turn", [])]  # what can be turned with: a primitive, or nothing but the turn
    for direction, turn in TURNS.items():
        for word, actions in movers:
            verbs.append((f"{word} opposite {direction}", [turn, turn, *actions]))
            verbs.append((f"{word} around {direction}", [turn, *actions] * 4))
            verbs.append((f"{word} {direction}", [turn, *actions]))
    verbs.extend(primitives)
    return verbs


@functools.cache
def all_pairs() -> tuple[Pair, ...]:
    """All 20,910 commands of the grammar with their action sequences, in a fixed order."""
    sentences = []
    for command, actions in _phrases():
        sentences.append((command, actions))
        sentences.append((f"{command} twice", actions * 2))
        sentences.append((f"{command} thrice", actions * 3))
    pairs = [(c, " ".join(a)) for c, a in sentences]
    for (first, a1), (second, a2) in product(sentences, repeat=2):
        pairs.append((f"{first} and {second}", " ".join(a1 + a2)))
        pairs.append((f"{first} after {second}", " ".join(a2 + a1)))
    return tuple(pairs)


@functools.cache
def translations() -> dict[str, str]:
    """command -> its action sequence, for every command of the grammar."""
    return dict(all_pairs())


@dataclass(frozen=True)
class Split:
    """A split's training and test pairs (training may repeat a pair, as Add Jump's file does)."""

    name: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]

    @property
    def train_commands(self) -> frozenset[str]:
        return frozenset(c for c, _ in self.train)

    @property
    def test_commands(self) -> frozenset[str]:
        return frozenset(c for c, _ in self.test)


def _words(command: str) -> list[str]:
    return command.split()


def _has_primitive_around_right(command: str) -> bool:
    words = _words(command)
    return any(words[i] in PRIMITIVES and words[i + 1 : i + 3] == ["around", "right"] for i in range(len(words) - 2))


@functools.cache
def split(name: str) -> Split:
    """The split ``name`` (one of ``SPLITS``)."""
    pairs = all_pairs()
    if name == "add_jump":
        train = [p for p in pairs if "jump" not in _words(p[0])]
        test = [p for p in pairs if "jump" in _words(p[0]) and p[0] != "jump"]
        copies = round(len(train) / (ADD_JUMP_PRIMITIVE_SHARE - 1))
        train += [("jump", PRIMITIVES["jump"])] * copies
    elif name == "around_right":
        train = [p for p in pairs if "around right" not in p[0]]
        test = [p for p in pairs if _has_primitive_around_right(p[0]) and "turn around right" not in p[0]]
    else:
        raise ValueError(f"unknown SCAN split {name!r}; choose from {list(SPLITS)}")
    return Split(name, tuple(train), tuple(test))


# One SCAN command (words separated by whitespace) as a regular expression: the grammar above is
# finite, hence regular. The OpenAPI schema states it as the commands' ``pattern``; ``check_command``
# is the same language (tested on every command and on random word sequences) and says where a
# command leaves it.
_U = "(?:walk|look|run|jump)"
_V = rf"(?:(?:{_U}|turn)\s+(?:(?:opposite|around)\s+)?(?:left|right)|{_U})"
_S = rf"{_V}(?:\s+(?:twice|thrice))?"
COMMAND_PATTERN = rf"^\s*{_S}(?:\s+(?:and|after)\s+{_S})?\s*$"


class NotACommand(ValueError):
    """Words outside SCAN's grammar: where the command leaves it and what could have come there."""

    def __init__(self, words: Sequence[str], position: int, expected: Sequence[str]) -> None:
        self.position, self.expected = position, tuple(expected)
        choices = " | ".join(expected)
        if position < len(words):
            after = f"after {words[position - 1]!r}" if position else "at the start"
            message = f"{words[position]!r} (word {position + 1}) cannot come {after}; expected {choices}"
        else:
            message = f"the command ends too early after {words[-1]!r}; expected {choices}"
        super().__init__(message)


@dataclass
class _Node:
    """A prefix of some commands: the words that may follow it, and whether it is a command itself."""

    next: dict[str, _Node] = field(default_factory=dict)
    complete: bool = False


@functools.cache
def _prefix_tree() -> _Node:
    root = _Node()
    for command, _ in all_pairs():
        node = root
        for word in command.split():
            node = node.next.setdefault(word, _Node())
        node.complete = True
    return root


def check_command(words: Sequence[str]) -> None:
    """``NotACommand`` unless ``words`` is a command of SCAN's grammar (``"twice twice"``, ``"jump
    and"`` and ``"turn"`` are not), naming the first word where it leaves the grammar."""
    node = _prefix_tree()
    for position, word in enumerate(words):
        following = node.next.get(word)
        if following is None:
            raise NotACommand(words, position, _choices(node))
        node = following
    if not node.complete:
        raise NotACommand(words, len(words), _choices(node))


def _choices(node: _Node) -> list[str]:
    return [*node.next, *(["(end)"] if node.complete else [])]


def parse_line(line: str) -> Pair:
    """``IN: <command> OUT: <actions>`` (a line of SCAN's files) -> (command, actions)."""
    head, sep, actions = line.strip().partition(" OUT: ")
    if not sep or not head.startswith("IN: "):
        raise ValueError(f"not a SCAN line: {line!r}")
    return head.removeprefix("IN: ").strip(), actions.strip()


def format_pairs(pairs: Sequence[Pair]) -> str:
    """The pairs as SCAN's files write them, one a line."""
    return "".join(f"IN: {c} OUT: {a}\n" for c, a in pairs)

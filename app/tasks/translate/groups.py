"""The groups of SCAN: word swaps acting on commands and, in step, on actions.

Each axis is a cycle of command words with the parallel cycle of actions:

* ``verb``: ``jump <-> run`` with ``I_JUMP <-> I_RUN`` (the paper's group for Add Jump, order 2);
* ``verb4``: ``jump -> run -> walk -> look -> jump`` with ``I_JUMP -> I_RUN -> I_WALK -> I_LOOK -> I_JUMP``
  (cyclic, order 4): every command has a copy without ``jump``, since a command names at most two verbs;
* ``direction``: ``left <-> right`` with ``I_TURN_LEFT <-> I_TURN_RIGHT`` (Around Right, order 2).

Axes joined by ``+`` generate their product (``verb+direction``, order 4; ``verb4+direction``, order 8;
``verb+verb4`` generates all 24 permutations of the four verbs). ``ceiling`` is the share of a test set
with some copy inside a training set: what a method that picks a copy the model knows can reach at most.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from app.equivariance.sequence import SequenceGroup

from .vocab import ACTIONS_VOCAB, COMMANDS

# axis -> (cycle of command words, cycle of actions)
AXES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "verb": (("jump", "run"), ("I_JUMP", "I_RUN")),
    "verb4": (("jump", "run", "walk", "look"), ("I_JUMP", "I_RUN", "I_WALK", "I_LOOK")),
    "direction": (("left", "right"), ("I_TURN_LEFT", "I_TURN_RIGHT")),
}
GROUPS: tuple[str, ...] = ("verb", "verb4", "direction", "verb+direction", "verb4+direction")  # the usual ones


def _cycle_map(size: int, ids: list[int]) -> list[int]:
    value_map = list(range(size))
    for src, dst in zip(ids, ids[1:] + ids[:1], strict=True):
        value_map[src] = dst
    return value_map


def parse_group(name: str) -> list[str]:
    """``"verb4+direction"`` -> ``["verb4", "direction"]``; ``ValueError`` naming the known axes."""
    axes = [a.strip() for a in name.split("+") if a.strip()]
    if not axes or len(set(axes)) != len(axes) or any(a not in AXES for a in axes):
        raise ValueError(f"unknown SCAN group {name!r}; axes are {sorted(AXES)}, joined by '+' (e.g. {GROUPS[-1]!r})")
    return axes


@functools.cache
def scan_group(name: str) -> SequenceGroup:
    """The group ``name`` acting on SCAN's command and action ids (cached: groups are immutable)."""
    axes = parse_group(name)
    input_maps, output_maps, names = [], [], []
    for axis in axes:
        words, actions = AXES[axis]
        input_maps.append(_cycle_map(len(COMMANDS), COMMANDS.encode(words)))
        output_maps.append(_cycle_map(len(ACTIONS_VOCAB), ACTIONS_VOCAB.encode(actions)))
        names.append(f"{words[0]}<->{words[1]}" if len(words) == 2 else "->".join(words))
    return SequenceGroup(
        name,
        input_maps,
        output_maps,
        names,
        fixed_inputs=[COMMANDS.id(t) for t in COMMANDS.specials],
        fixed_outputs=[ACTIONS_VOCAB.id(t) for t in ACTIONS_VOCAB.specials],
    )


def command_copies(group: SequenceGroup, command: str) -> list[str]:
    """``[g·x for g in G]`` as command strings (element order)."""
    ids = COMMANDS.encode(command.split())
    value_maps = group.input.value_maps.tolist()
    return [" ".join(COMMANDS.decode(value_maps[g][i] for i in ids)) for g in range(group.order)]


def ceiling(group: SequenceGroup, test: Iterable[str], train: Iterable[str]) -> float:
    """The share of ``test`` commands with some copy ``g·x`` among the ``train`` commands."""
    known = set(train)
    test = list(test)
    if not test:
        return 0.0
    return sum(any(c in known for c in command_copies(group, x)) for x in test) / len(test)

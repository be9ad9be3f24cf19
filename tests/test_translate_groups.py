"""The SCAN groups: axioms on both vocabularies, the same elements on each side, specials fixed,
and the ceilings of the issue (77.1% / 100% / 83.9%) computed from the generated splits."""

from __future__ import annotations

import itertools

import pytest
import torch

from app.equivariance.sequence import SequenceGroup
from app.tasks.translate.groups import GROUPS, ceiling, command_copies, parse_group, scan_group
from app.tasks.translate.scan import split
from app.tasks.translate.vocab import ACTIONS_VOCAB, COMMANDS

ORDERS = {"verb": 2, "verb4": 4, "direction": 2, "verb+direction": 4, "verb4+direction": 8, "verb+verb4": 24}


@pytest.mark.parametrize("name", [*GROUPS, "verb+verb4"])
def test_axioms_hold_on_both_vocabularies(name: str) -> None:
    group = scan_group(name)
    n = group.order
    assert n == ORDERS[name] and group.names[0] == "identity" and len(set(group.names)) == n
    assert group.input.names == group.output.names and torch.equal(group.input.table, group.output.table)
    words = torch.randint(0, len(COMMANDS), (5, 7))
    actions = torch.randint(0, len(ACTIONS_VOCAB), (5, 11))
    for side, ids in ((group.input, words), (group.output, actions)):
        for g, h in itertools.product(range(n), repeat=2):
            # the action is a homomorphism: acting with h, then g, is acting with g*h
            assert torch.equal(side.act(side.act(ids, h), g), side.act(ids, group.compose(g, h)))
        for g in range(n):
            assert torch.equal(side.act(side.act(ids, g), group.inverse(g)), ids)
        assert torch.equal(side.act(ids, 0), ids)
    for a, b, c in itertools.product(range(min(n, 8)), repeat=3):
        assert group.compose(group.compose(a, b), c) == group.compose(a, group.compose(b, c))
    # padding, start and end of sequence stay where they are
    assert bool((group.input.value_maps[:, 0] == 0).all())
    assert bool((group.output.value_maps[:, :3] == torch.arange(3)).all())


def test_words_and_actions_move_together() -> None:
    verb4 = scan_group("verb4")
    assert command_copies(verb4, "jump twice after walk left") == [
        "jump twice after walk left",
        "run twice after look left",
        "walk twice after jump left",
        "look twice after run left",
    ]
    for g in range(verb4.order):
        word = command_copies(verb4, "jump")[g]
        assert verb4.act_output(ACTIONS_VOCAB.encode(["I_JUMP"]), g) == ACTIONS_VOCAB.encode(["I_" + word.upper()])
    direction = scan_group("direction")
    assert command_copies(direction, "turn left and walk right")[1] == "turn right and walk left"
    assert ACTIONS_VOCAB.decode(direction.act_output(ACTIONS_VOCAB.encode(["I_TURN_LEFT", "I_WALK"]), 1)) == [
        "I_TURN_RIGHT",
        "I_WALK",
    ]


def test_mismatched_actions_and_moved_specials_are_refused() -> None:
    swap = list(range(len(COMMANDS)))
    swap[3], swap[4] = 4, 3
    cycle = list(range(len(ACTIONS_VOCAB)))
    cycle[3], cycle[4], cycle[5] = 4, 5, 3  # order 3 on the outputs, order 2 on the inputs
    with pytest.raises(ValueError, match="same group"):
        SequenceGroup("bad", [swap], [cycle], ["x"])
    moves_pad = list(range(len(COMMANDS)))
    moves_pad[0], moves_pad[1] = 1, 0
    out = list(range(len(ACTIONS_VOCAB)))
    out[3], out[4] = 4, 3
    with pytest.raises(ValueError, match="special"):
        SequenceGroup("bad", [moves_pad], [out], ["x"], fixed_inputs=[0])


def test_unknown_groups_name_the_axes() -> None:
    assert parse_group("verb4 + direction") == ["verb4", "direction"]
    for name in ("colour", "verb+verb", "", "verb+colour"):
        with pytest.raises(ValueError, match="axes are"):
            parse_group(name)


def test_ceilings_of_the_issue() -> None:
    add_jump, around_right = split("add_jump"), split("around_right")
    assert round(100 * ceiling(scan_group("verb"), add_jump.test_commands, add_jump.train_commands), 1) == 77.1
    assert ceiling(scan_group("verb4"), add_jump.test_commands, add_jump.train_commands) == 1.0
    assert (
        round(100 * ceiling(scan_group("direction"), around_right.test_commands, around_right.train_commands), 1)
        == 83.9
    )
    both = [c for c in add_jump.test_commands if "run" in c.split()]
    assert len(both) == 1764  # these keep a `jump` in every copy under verb
    assert ceiling(scan_group("verb"), both, add_jump.train_commands) == 0.0

"""SCAN generated from its grammar: the command set, the splits, the vocabularies; equal to the
original files when ``../shared/data/scan`` is there (only that comparison is skipped without them)."""

from __future__ import annotations

import gzip
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from app.tasks.translate.scan import (
    COMMAND_PATTERN,
    SPLITS,
    NotACommand,
    all_pairs,
    check_command,
    format_pairs,
    parse_line,
    split,
    translations,
)
from app.tasks.translate.vocab import ACTIONS, ACTIONS_VOCAB, COMMAND_WORDS, COMMANDS, UnknownToken

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "scan"
FILES = {
    "add_jump": ("tasks_train_addprim_jump.txt.gz", "tasks_test_addprim_jump.txt.gz"),
    "around_right": ("tasks_train_template_around_right.txt.gz", "tasks_test_template_around_right.txt.gz"),
}


def read_reference(name: str) -> list[tuple[str, str]]:
    if not (REFERENCE / name).is_file():
        pytest.skip(f"the reference SCAN files are not here ({REFERENCE}); the comparison needs them")
    with gzip.open(REFERENCE / name, "rt") as f:
        return [parse_line(line) for line in f if line.strip()]


def test_the_grammar_gives_every_command_once_with_its_words_and_actions() -> None:
    pairs = all_pairs()
    assert len(pairs) == 20910 == len(translations())  # 102 + 2·102²: no command twice
    words = {w for c, _ in pairs for w in c.split()}
    actions = {a for _, seq in pairs for a in seq.split()}
    assert words == set(COMMAND_WORDS) and actions == set(ACTIONS)
    assert max(len(c.split()) for c, _ in pairs) == 9 and max(len(a.split()) for _, a in pairs) == 48


@pytest.mark.parametrize(
    ("command", "actions"),
    [
        ("jump", "I_JUMP"),
        ("turn left", "I_TURN_LEFT"),
        ("walk opposite right", "I_TURN_RIGHT I_TURN_RIGHT I_WALK"),
        ("turn around left", "I_TURN_LEFT I_TURN_LEFT I_TURN_LEFT I_TURN_LEFT"),
        ("look around right twice", " ".join(["I_TURN_RIGHT I_LOOK"] * 8)),
        ("jump twice after walk left", "I_TURN_LEFT I_WALK I_JUMP I_JUMP"),
        ("run thrice and turn opposite left", "I_RUN I_RUN I_RUN I_TURN_LEFT I_TURN_LEFT"),
    ],
)
def test_meaning_follows_the_paper(command: str, actions: str) -> None:
    # Examples of Lake & Baroni's Figure 1 and of their grammar's interpretation rules.
    assert translations()[command] == actions


def test_add_jump_split() -> None:
    s = split("add_jump")
    counts = Counter(c for c, _ in s.train)
    assert counts["jump"] == 1467 and len(s.train) == 14670 and len(s.test) == 7706
    assert counts["jump"] * 10 == len(s.train)  # the bare primitive is one tenth of the file
    assert all(n == 1 for c, n in counts.items() if c != "jump")
    assert not s.train_commands & s.test_commands
    assert all("jump" not in c.split() for c in s.train_commands - {"jump"})
    assert all("jump" in c.split() for c in s.test_commands)
    assert len(s.train_commands | s.test_commands) == 20910


def test_around_right_split() -> None:
    s = split("around_right")
    assert len(s.train) == len(s.train_commands) == 15225 and len(s.test) == 4476
    assert not s.train_commands & s.test_commands
    assert all("around right" not in c for c in s.train_commands)
    assert all("around right" in c and "turn around right" not in c for c in s.test_commands)
    neither = set(translations()) - s.train_commands - s.test_commands
    assert len(neither) == 1209 and all("turn around right" in c for c in neither)


def test_unknown_split_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="add_jump"):
        split("length")


def test_full_command_set_equals_the_reference() -> None:
    assert set(read_reference("tasks.txt.gz")) == set(all_pairs())


@pytest.mark.parametrize("name", SPLITS)
def test_splits_equal_the_reference(name: str) -> None:
    train_file, test_file = FILES[name]
    reference_train, reference_test = read_reference(train_file), read_reference(test_file)
    s = split(name)
    assert set(s.train) == set(reference_train) and set(s.test) == set(reference_test)
    assert Counter(s.train) == Counter(reference_train)  # the repeated `jump` pair too
    assert len(s.test) == len(reference_test)


def test_lines_round_trip() -> None:
    pairs = list(all_pairs()[:5])
    assert [parse_line(line) for line in format_pairs(pairs).splitlines()] == pairs
    with pytest.raises(ValueError):
        parse_line("jump I_JUMP")


def test_vocabularies_put_specials_first_and_refuse_unknown_words() -> None:
    assert COMMANDS.decode(COMMANDS.encode(["jump", "twice"])) == ["jump", "twice"]
    assert min(COMMANDS.encode(COMMAND_WORDS)) == len(COMMANDS.specials)
    assert ACTIONS_VOCAB.encode(ACTIONS) == list(range(3, 3 + len(ACTIONS)))
    with pytest.raises(UnknownToken) as info:
        COMMANDS.encode(["jump", "fly"])
    assert info.value.token == "fly" and info.value.position == 1 and "fly" in str(info.value)
    with pytest.raises(UnknownToken):
        COMMANDS.encode(["<pad>"])  # specials are not words


def test_the_grammar_check_and_the_pattern_are_the_grammar() -> None:
    """Every command passes both; random word sequences pass exactly when they are commands."""
    pattern = re.compile(COMMAND_PATTERN)
    commands = set(translations())
    for command in commands:
        check_command(command.split())
        assert pattern.search(command) and pattern.search(f" {command.replace(' ', chr(9) + ' ')}\n")
    rng = random.Random(0)
    words = list(COMMANDS.tokens)
    tried = inside = 0
    for _ in range(20_000):
        sequence = [rng.choice(words) for _ in range(rng.randint(1, 9))]
        command = " ".join(sequence)
        is_command = command in commands
        try:
            check_command(sequence)
            checked = True
        except NotACommand:
            checked = False
        assert checked == is_command == bool(pattern.search(command)), command
        tried, inside = tried + 1, inside + is_command
    assert tried == 20_000 and inside > 0
    # Near misses, which random sequences rarely hit.
    near_misses = ("turn", "jump and", "walk around", "turn left twice thrice", "jump after after", "run left left")
    for near in near_misses:
        assert near not in commands and not pattern.search(near)
        with pytest.raises(NotACommand):
            check_command(near.split())

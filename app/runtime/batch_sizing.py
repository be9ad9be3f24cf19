"""Which batch size to cap batches at: the one whose fused pass is cheapest per item, measured.

Batching pays while a bigger pass costs less per item. On a GPU that holds up to large
batches. On a CPU it may stop early: the activations of a big batch (every copy of every
image) outgrow the caches, and a batch of 32 can cost more per image than a batch of 8.
A batcher capped there serves more requests per second, and each one waits for a smaller
batch. The measurement is the model's own pass on this machine, so nothing here assumes a
machine or a model.

A cap below the largest size is a claim that the largest is dearer, so it needs evidence
that a shared machine's noise cannot fake: every size is timed in several interleaved rounds,
and the cap is lowered only when the cheaper size beat the largest by more than the tolerance
in every round but at most one. It never goes below a floor (a pass of a few images, each as |G| copies,
still amortises the per-pass cost), so noise can never switch batching off. The decision is
kept per model and machine (``BatchSizeCache``) and reused by the next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .machine import cpu_model, usable_cpus

log = logging.getLogger("equiserve.batch_sizing")

# A bigger batch within this fraction of the cheapest per item is taken: batch sizes on the
# flat part of the curve differ by less than a shared machine's noise, so without a margin
# the choice among them would be chance, and a bigger batch takes fewer hand-offs per item.
TOLERANCE = 0.10
ROUNDS = 5
# Rows of one fused pass (images x |G| copies) below which batching is never given up: the
# floor in images is this divided by |G|, at least 2.
MIN_PASS_ROWS = 32


def candidate_sizes(limit: int) -> list[int]:
    """1, 2, 4, ... below ``limit``, and ``limit``."""
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def floor_for(copies: int, limit: int) -> int:
    """The smallest cap the tuner may choose for a model of ``copies`` copies per item."""
    return min(limit, max(2, -(-MIN_PASS_ROWS // max(copies, 1))))


@dataclass(frozen=True)
class BatchSizeChoice:
    """A cap and its evidence: every round's seconds per item of every size, and why."""

    limit: int
    per_item_s: dict[int, list[float]]
    reason: str

    def summary(self) -> str:
        medians = ", ".join(f"{size}: {statistics.median(costs) * 1000:.2f}" for size, costs in self.per_item_s.items())
        return f"batches of up to {self.limit} ({self.reason}); ms per item by batch size, median of rounds: {medians}"


def choose(per_item_s: Mapping[int, Sequence[float]], floor: int = 1, tolerance: float = TOLERANCE) -> BatchSizeChoice:
    """The cap from measured rounds (seconds per item, by size)."""
    largest = max(per_item_s)
    medians = {size: statistics.median(costs) for size, costs in per_item_s.items()}
    best = min(medians.values())
    # the largest size within the tolerance of the cheapest, as the medians say...
    candidate = max(size for size, cost in medians.items() if cost <= best * (1 + tolerance))
    candidate = max(candidate, min(floor, largest))
    kept = {int(size): [float(c) for c in costs] for size, costs in per_item_s.items()}
    if candidate == largest:
        return BatchSizeChoice(largest, kept, "the largest batch is within the tolerance of the cheapest per item")
    # ...and lowered below the largest only if it beat the largest by the tolerance in every round
    # but at most one (a burst of other work may spoil one round of any size).
    pairs = list(zip(per_item_s[candidate], per_item_s[largest], strict=True))
    wins = sum(small * (1 + tolerance) < big for small, big in pairs)
    needed = len(pairs) - 1 if len(pairs) >= 3 else len(pairs)
    if wins >= needed:
        return BatchSizeChoice(
            candidate,
            kept,
            f"{candidate} was cheaper per item than {largest} by over {tolerance:.0%} in {wins} of {len(pairs)} rounds",
        )
    return BatchSizeChoice(
        largest, kept, f"{candidate} beat {largest} in only {wins} of {len(pairs)} rounds: not significant"
    )


def measure(time_batch: Callable[[int], float], limit: int, *, rounds: int = ROUNDS) -> dict[int, list[float]]:
    """Seconds per item of every candidate size, one entry per round, the rounds interleaved so
    that a burst of other work on the machine slows one round of every size, not every round of one."""
    sizes = candidate_sizes(limit)
    per_item: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(rounds):
        for size in sizes:
            per_item[size].append(time_batch(size) / size)
    return per_item


def fastest_batch_size(
    time_batch: Callable[[int], float], limit: int, *, copies: int = 1, rounds: int = ROUNDS
) -> BatchSizeChoice:
    """Time ``time_batch(size)`` (seconds of one pass) for every candidate size and choose the cap."""
    return choose(measure(time_batch, limit, rounds=rounds), floor_for(copies, limit))


class BatchSizeCache:
    """Decisions kept in a JSON file, by a key of everything they depend on (the model, its runtime,
    the batch limit, the machine): the next start reuses its decision instead of drawing anew.
    Delete the file to measure again."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def key(facts: Mapping[str, Any]) -> str:
        machine = {"cpu": cpu_model(), "cpus": usable_cpus()}
        return hashlib.sha256(json.dumps({**facts, **machine}, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, key: str) -> BatchSizeChoice | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            per_item = {int(size): [float(c) for c in costs] for size, costs in entry["per_item_s"].items()}
            return BatchSizeChoice(int(entry["limit"]), per_item, str(entry["reason"]))
        except (KeyError, TypeError, ValueError):  # an entry of another version: measure again
            return None

    def put(self, key: str, choice: BatchSizeChoice) -> None:
        entries = self._read()
        entries[key] = asdict(choice)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(entries, indent=1))
            temporary.replace(self.path)  # atomic: processes starting together never read half a file
        except OSError as exc:  # a read-only cache: the decision holds for this run only
            log.warning("cannot keep the batch-size decision in %s: %s", self.path, exc)

    def _read(self) -> dict[str, Any]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

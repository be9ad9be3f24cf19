"""A fused batch may mix requests that ask for different things (methods, label sets, R-EquiLM):
its rows are grouped by what they asked, each group is combined once, and a group that fails
fails only its own rows. Every task's batch function does this with the two helpers here."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


def group_rows(keys: Sequence[K]) -> dict[K, list[int]]:
    """Row indices by key, keys in order of first appearance."""
    groups: dict[K, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    return groups


def per_group(keys: Sequence[K], run: Callable[[K, list[int]], Sequence[R]]) -> list[R | BaseException]:
    """``run(key, rows)`` once per group of rows with the same key; its results, one per row, go
    back to their rows. A group that raises gets its exception in each of its rows, the others
    their results: one bad method or label set must not fail the rest of the batch."""
    results: list[R | BaseException] = [RuntimeError("not computed")] * len(keys)
    for key, rows in group_rows(keys).items():
        try:
            outputs = run(key, rows)
            if len(outputs) != len(rows):
                raise RuntimeError(f"{len(outputs)} results for {len(rows)} rows")
        except Exception as exc:
            for row in rows:
                results[row] = exc
            continue
        for row, output in zip(rows, outputs, strict=True):
            results[row] = output
    return results

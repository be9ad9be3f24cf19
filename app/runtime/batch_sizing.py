"""Which batch size to cap batches at: the one whose fused pass is cheapest per item, measured.

Batching pays while a bigger pass costs less per item. On a GPU that holds up to large
batches. On a CPU it may stop early: the activations of a big batch (every copy of every
image) outgrow the caches, and a batch of 32 can cost more per image than a batch of 8.
A batcher capped there serves more requests per second, and each one waits for a smaller
batch. The measurement is the model's own pass on this machine, so nothing here assumes a
machine or a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

# A bigger batch within this fraction of the cheapest per item is taken: batch sizes on the
# flat part of the curve differ by less than a shared machine's noise, so without a margin
# the choice among them would be chance, and a bigger batch takes fewer hand-offs per item.
TOLERANCE = 0.10


def candidate_sizes(limit: int) -> list[int]:
    """1, 2, 4, ... below ``limit``, and ``limit``."""
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def cheapest_per_item(seconds: Mapping[int, float], tolerance: float = TOLERANCE) -> int:
    """The largest batch size whose seconds per item are within ``tolerance`` of the cheapest."""
    per_item = {size: s / size for size, s in seconds.items()}
    best = min(per_item.values())
    return max(size for size, cost in per_item.items() if cost <= best * (1 + tolerance))


def fastest_batch_size(
    time_batch: Callable[[int], float], limit: int, *, rounds: int = 2
) -> tuple[int, dict[int, float]]:
    """Time ``time_batch(size)`` (seconds of one pass) for every candidate size, interleaved
    ``rounds`` times; the size to cap batches at and the best seconds per item of each size.
    The fastest round of a size counts: other jobs on the machine only ever slow one down."""
    sizes = candidate_sizes(limit)
    best: dict[int, float] = {}
    for _ in range(rounds):
        for size in sizes:
            elapsed = time_batch(size)
            best[size] = min(elapsed, best.get(size, elapsed))
    return cheapest_per_item(best), {size: s / size for size, s in best.items()}

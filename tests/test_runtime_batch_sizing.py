"""Capping batches at the size cheapest per item: the choice, its measurement, and that a
warmed-up image model on the CPU hands its cap to the engine's batcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine.engine import Engine
from app.runtime.batch_sizing import candidate_sizes, cheapest_per_item, fastest_batch_size
from app.tasks.classify.model import ClassifyModel
from tests.apptools import make_settings
from tests.imagetools import write_tiny_model


def cache_cliff(size: int) -> float:
    """Seconds of one pass: 10 ms per image up to 8 images, 15 ms per image beyond (caches outgrown)."""
    return size * (0.010 if size <= 8 else 0.015)


def test_candidates_are_powers_of_two_and_the_limit() -> None:
    assert candidate_sizes(1) == [1]
    assert candidate_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert candidate_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


def test_the_cheapest_per_item_wins_and_ties_go_to_the_larger() -> None:
    sizes = candidate_sizes(32)
    assert cheapest_per_item({s: cache_cliff(s) for s in sizes}) == 8
    assert cheapest_per_item({s: 0.020 + 0.001 * s for s in sizes}) == 32  # fixed cost per pass: batch all
    # 16 is 8 % dearer per item than 8: within the tolerance, so the bigger batch is taken
    assert cheapest_per_item({1: 0.05, 8: 0.080, 16: 0.1728, 32: 0.48}) == 16
    assert cheapest_per_item({1: 0.05, 8: 0.080, 16: 0.1728, 32: 0.48}, tolerance=0.05) == 8


def test_the_fastest_round_counts() -> None:
    """Another job slowing one round of size 8 down does not move the choice."""
    calls: list[int] = []

    def time_batch(size: int) -> float:
        calls.append(size)
        burst = 3.0 if size == 8 and calls.count(8) == 1 else 1.0
        return cache_cliff(size) * burst

    chosen, per_item = fastest_batch_size(time_batch, 32, rounds=2)
    assert chosen == 8 and per_item[8] == pytest.approx(0.010) and per_item[32] == pytest.approx(0.015)
    assert calls == candidate_sizes(32) * 2  # interleaved rounds


@pytest.mark.parametrize("tune", [True, False])
async def test_warmup_caps_the_batcher_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tune: bool) -> None:
    write_tiny_model(tmp_path)
    timed: list[int] = []

    def fake_pass(self: ClassifyModel, size: int) -> float:
        timed.append(size)
        return cache_cliff(size)

    monkeypatch.setattr(ClassifyModel, "_run_warmup_batch", fake_pass)
    settings = make_settings(tmp_path, warmup=True, tune_batch_size=tune, max_batch_size=32, memory_trim_idle_s=0)
    engine = Engine(settings)
    await engine.start()
    try:
        model = engine.models["tiny"]
        assert isinstance(model, ClassifyModel)
        assert engine.batchers["tiny"].max_batch_size == model.max_batch_size(32) == (8 if tune else 32)
        assert timed == [32, *candidate_sizes(32) * 2] if tune else timed == [32]
        assert model.max_batch_size(4) == 4  # never above EQUISERVE_MAX_BATCH_SIZE
    finally:
        await engine.stop()

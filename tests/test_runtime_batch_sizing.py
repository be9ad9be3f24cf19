"""Capping batches at the size cheapest per item: the choice, its measurement, and that a
warmed-up image model on the CPU hands its cap to the engine's batcher."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.engine.engine import Engine
from app.runtime.batch_sizing import BatchSizeCache, candidate_sizes, choose, fastest_batch_size, floor_for
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


def rounds(costs: dict[int, float], n: int = 5) -> dict[int, list[float]]:
    """``n`` equal rounds of seconds per item for each size."""
    return {size: [cost] * n for size, cost in costs.items()}


def test_the_cheapest_per_item_wins_and_ties_go_to_the_larger() -> None:
    sizes = candidate_sizes(32)
    assert choose(rounds({s: cache_cliff(s) / s for s in sizes})).limit == 8
    assert choose(rounds({s: 0.020 / s + 0.001 for s in sizes})).limit == 32  # fixed cost per pass: batch all
    # 16 is 8 % dearer per item than 8: within the tolerance, so the bigger batch is taken
    per_item = {1: 0.05, 8: 0.010, 16: 0.0108, 32: 0.015}
    assert choose(rounds(per_item)).limit == 16
    assert choose(rounds(per_item), tolerance=0.05).limit == 8


def test_noise_never_lowers_the_cap() -> None:
    """A flat curve measured on a busy machine: the largest batch's median looks dearer, but its
    rounds overlap the others', so the cap stays; the same median in every round is a real cost."""
    steady = {1: 0.012, 2: 0.0101, 4: 0.0100, 8: 0.0102, 16: 0.0104}
    noisy = {**rounds(steady), 32: [0.0136, 0.0100, 0.0136, 0.0100, 0.0136]}  # median 36 % above the best
    choice = choose(noisy)
    assert choice.limit == 32 and "only 3 of 5 rounds: not significant" in choice.reason
    dearer = choose({**rounds(steady), 32: [0.0136] * 5})
    assert dearer.limit == 16 and "in 5 of 5 rounds" in dearer.reason


def test_the_cap_never_goes_below_the_floor() -> None:
    """Even where single images look cheapest, a model of |G| copies keeps batching."""
    single_cheapest = rounds({1: 0.001, 2: 0.004, 4: 0.008, 8: 0.010, 16: 0.011, 32: 0.012})
    assert floor_for(4, 32) == 8 and floor_for(8, 32) == 4 and floor_for(1, 32) == 32 and floor_for(4, 4) == 4
    assert choose(single_cheapest, floor=floor_for(4, 32)).limit == 8
    assert choose(single_cheapest, floor=1).limit == 1


def test_rounds_are_interleaved_and_all_kept() -> None:
    """Another job slowing one round of size 8 down does not move the choice, and the evidence
    (every round of every size) comes with it."""
    calls: list[int] = []

    def time_batch(size: int) -> float:
        calls.append(size)
        burst = 3.0 if size == 8 and calls.count(8) == 1 else 1.0
        return cache_cliff(size) * burst

    choice = fastest_batch_size(time_batch, 32, copies=4, rounds=5)
    assert choice.limit == 8 and choice.per_item_s[8][1:] == [pytest.approx(0.010)] * 4
    assert choice.per_item_s[32] == [pytest.approx(0.015)] * 5
    assert calls == candidate_sizes(32) * 5  # interleaved rounds
    assert "8: 10.00" in choice.summary()


def test_decisions_are_kept_per_model_and_machine(tmp_path: Path) -> None:
    cache = BatchSizeCache(tmp_path / "sizes.json")
    choice = choose(rounds({1: 0.02, 8: 0.010, 32: 0.015}))
    key = BatchSizeCache.key({"model": "a", "limit": 32})
    assert cache.get(key) is None
    cache.put(key, choice)
    assert BatchSizeCache(tmp_path / "sizes.json").get(key) == choice
    assert cache.get(BatchSizeCache.key({"model": "a", "limit": 16})) is None  # another limit: measured again
    (tmp_path / "sizes.json").write_text("{not json")
    assert cache.get(key) is None  # a broken file is no decision


@pytest.mark.parametrize("tune", [True, False])
async def test_warmup_caps_the_batcher_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tune: bool) -> None:
    write_tiny_model(tmp_path)
    timed: list[int] = []

    def fake_pass(self: ClassifyModel, size: int) -> float:
        timed.append(size)
        return cache_cliff(size)

    monkeypatch.setattr(ClassifyModel, "_run_warmup_batch", fake_pass)
    settings = make_settings(tmp_path, warmup=True, tune_batch_size=tune, max_batch_size=32, memory_trim_idle_s=0,
                             onnx_cache_dir=tmp_path / "cache")  # fmt: skip
    for start in range(2):  # the second start reuses the first one's decision
        timed.clear()
        engine = Engine(settings)
        await engine.start()
        try:
            model = engine.models["tiny"]
            assert isinstance(model, ClassifyModel)
            assert engine.batchers["tiny"].max_batch_size == model.max_batch_size(32) == (8 if tune else 32)
            measured = [32, *candidate_sizes(32) * 5] if start == 0 else [32]
            assert timed == measured if tune else timed == [32]
            assert model.max_batch_size(4) == 4  # never above EQUISERVE_MAX_BATCH_SIZE
        finally:
            await engine.stop()


async def test_a_pinned_batch_size_is_served_and_nothing_is_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_tiny_model(tmp_path)
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    (folder / "model.yaml").write_text(yaml.safe_dump({**spec, "max_batch_size": 4}))
    timed: list[int] = []
    monkeypatch.setattr(ClassifyModel, "_run_warmup_batch", lambda self, size: timed.append(size) or 0.01)
    settings = make_settings(tmp_path, warmup=True, tune_batch_size=True, max_batch_size=32, memory_trim_idle_s=0,
                             onnx_cache_dir=tmp_path / "cache")  # fmt: skip
    engine = Engine(settings)
    await engine.start()
    try:
        assert engine.batchers["tiny"].max_batch_size == 4 and timed == [4]
    finally:
        await engine.stop()

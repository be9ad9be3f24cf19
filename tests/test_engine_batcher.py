"""DynamicBatcher: timing from the first item, bounds, deadlines, cancellation, failures, drain."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.engine.batcher import DynamicBatcher
from app.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull, TooLarge


class Recorder:
    """A handler that records its batches and can be held to build up a queue."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.gate.wait(5)
        time.sleep(self.delay_s)
        self.batches.append(list(items))
        return [i * 10 if i >= 0 else ValueError(f"bad item {i}") for i in items]


async def started(handler: Recorder, **kwargs: float) -> DynamicBatcher[int, int]:
    batcher: DynamicBatcher[int, int] = DynamicBatcher("m", handler, **kwargs)  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def test_full_batch_leaves_without_waiting() -> None:
    handler = Recorder()
    batcher = await started(handler, max_batch_size=4, max_wait_s=10.0)
    t0 = time.perf_counter()
    answers = await asyncio.gather(*(batcher.submit(i, 5) for i in range(4)))
    assert time.perf_counter() - t0 < 2.0  # nowhere near the 10 s max wait
    assert [r for r, _ in answers] == [0, 10, 20, 30]
    assert handler.batches == [[0, 1, 2, 3]]
    assert all(info.batch_size == 4 for _, info in answers)
    await batcher.close()


async def test_max_wait_is_measured_from_the_first_item() -> None:
    handler = Recorder()
    batcher = await started(handler, max_batch_size=100, max_wait_s=0.3)
    on_its_way = batcher.announce()  # a third request being decoded keeps the batch waiting
    t0 = time.perf_counter()
    first = asyncio.ensure_future(batcher.submit(1, 5))
    await asyncio.sleep(0.2)
    second = asyncio.ensure_future(batcher.submit(2, 5))
    await asyncio.gather(first, second)
    elapsed = time.perf_counter() - t0
    # one batch with both, leaving ~0.3 s after the FIRST item (not 0.3 s after the second)
    assert handler.batches == [[1, 2]]
    assert 0.28 <= elapsed < 0.45, elapsed
    on_its_way.close()
    await batcher.close()


async def test_a_lone_request_leaves_at_once() -> None:
    """Nothing announced: waiting could not fill the batch, so it does not wait."""
    handler = Recorder()
    batcher = await started(handler, max_batch_size=100, max_wait_s=5.0)
    t0 = time.perf_counter()
    _, info = await batcher.submit(1, 10)
    assert time.perf_counter() - t0 < 1.0 and info.queue_s < 1.0  # nowhere near the 5 s wait
    await batcher.close()


async def test_a_batch_waits_for_an_announced_request_and_leaves_when_it_is_queued() -> None:
    handler = Recorder()
    batcher = await started(handler, max_batch_size=100, max_wait_s=5.0)
    arrival = batcher.announce()
    t0 = time.perf_counter()
    first = asyncio.ensure_future(batcher.submit(1, 10))
    await asyncio.sleep(0.2)
    assert not first.done()  # waiting for the announced request
    second = asyncio.ensure_future(batcher.submit(2, 10))
    await asyncio.sleep(0)
    arrival.close()
    arrival.close()  # idempotent: the count must not go negative
    await asyncio.gather(first, second)
    assert handler.batches == [[1, 2]] and time.perf_counter() - t0 < 1.5
    assert batcher._arriving == 0
    _, info = await batcher.submit(3, 10)  # and a lone request after it still leaves at once
    assert info.queue_s < 1.0
    await batcher.close()


async def test_an_announced_request_that_fails_releases_the_batch() -> None:
    handler = Recorder()
    batcher = await started(handler, max_batch_size=100, max_wait_s=5.0)
    arrival = batcher.announce()
    first = asyncio.ensure_future(batcher.submit(1, 10))
    await asyncio.sleep(0.1)
    t0 = time.perf_counter()
    arrival.close()  # e.g. its image did not decode: it never joins
    await first
    assert time.perf_counter() - t0 < 1.0 and handler.batches == [[1]]
    await batcher.close()


async def test_queue_bound_refuses_at_once() -> None:
    handler = Recorder()
    handler.gate.clear()  # hold the first batch in the handler
    batcher = await started(handler, max_batch_size=1, max_wait_s=0.0, queue_size=2)
    in_flight = asyncio.ensure_future(batcher.submit(0, 5))
    await asyncio.sleep(0.05)  # item 0 is now inside the handler, the queue is empty
    queued = [asyncio.ensure_future(batcher.submit(i, 5)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as info:
        await batcher.submit(3, 5)
    assert info.value.retry_after_s >= 1
    handler.gate.set()
    assert [r for r, _ in await asyncio.gather(in_flight, *queued)] == [0, 10, 20]
    await batcher.close()


async def test_deadline_passed_in_the_queue_gives_deadline_exceeded() -> None:
    handler = Recorder()
    batcher = await started(handler, max_batch_size=10, max_wait_s=0.2)
    arrival = batcher.announce()  # the batch waits 0.2 s for it, past the item's deadline
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(1, timeout_s=0.01)
    assert handler.batches == []  # it never reached the model
    assert batcher.stats.expired == 1
    arrival.close()
    await batcher.close()


async def test_a_deadline_is_answered_when_it_passes_not_when_a_batch_reaches_the_item() -> None:
    handler = Recorder()
    handler.gate.clear()  # a long batch in flight
    batcher = await started(handler, max_batch_size=1, max_wait_s=0.0)
    in_flight = asyncio.ensure_future(batcher.submit(1, 10))
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(2, timeout_s=0.1)  # queued behind it
    assert time.perf_counter() - t0 < 0.5  # at its deadline, while the batch still runs
    assert batcher.depth == 0 and batcher.stats.expired == 1
    handler.gate.set()
    assert (await in_flight)[0] == 10
    assert handler.batches == [[1]]  # the expired item never reached the model
    await batcher.close()


async def test_cancelled_items_are_dropped_before_the_forward_pass() -> None:
    handler = Recorder()
    batcher = await started(handler, max_batch_size=10, max_wait_s=0.1)
    arrival = batcher.announce()  # keeps the batch waiting while one of its items is cancelled
    gone = asyncio.ensure_future(batcher.submit(7, 5))
    kept = asyncio.ensure_future(batcher.submit(8, 5))
    await asyncio.sleep(0.01)
    gone.cancel()
    result, _ = await kept
    arrival.close()
    assert result == 80
    assert handler.batches == [[8]]
    assert batcher.stats.cancelled == 1
    await batcher.close()


async def test_per_item_errors_stay_with_their_item() -> None:
    batcher = await started(Recorder(), max_batch_size=3, max_wait_s=0.05)
    results = await asyncio.gather(
        batcher.submit(1, 5), batcher.submit(-1, 5), batcher.submit(2, 5), return_exceptions=True
    )
    assert results[0][0] == 10 and results[2][0] == 20
    assert isinstance(results[1], ValueError)
    await batcher.close()


async def test_a_failing_batch_fails_only_its_items_and_the_loop_goes_on() -> None:
    calls = {"n": 0}

    def flaky(items: list[int]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: device-side assert")
        return [i for i in items]

    batcher: DynamicBatcher[int, int] = DynamicBatcher("m", flaky, max_batch_size=2, max_wait_s=0.05)
    batcher.start()
    first = await asyncio.gather(batcher.submit(1, 5), batcher.submit(2, 5), return_exceptions=True)
    assert all(isinstance(r, InferenceFailed) for r in first)
    assert (await batcher.submit(3, 5))[0] == 3
    assert batcher.stats.failed_batches == 1
    await batcher.close()


async def test_close_answers_everything_accepted_then_refuses() -> None:
    handler = Recorder(delay_s=0.02)
    batcher = await started(handler, max_batch_size=2, max_wait_s=0.01)
    pending = [asyncio.ensure_future(batcher.submit(i, 5)) for i in range(7)]
    await asyncio.sleep(0)
    await batcher.close()
    assert [r for r, _ in await asyncio.gather(*pending)] == [i * 10 for i in range(7)]
    with pytest.raises(NotReady):
        await batcher.submit(1, 5)
    assert sum(len(b) for b in handler.batches) == 7


async def test_metrics_hooks_are_called() -> None:
    seen: dict[str, list[float]] = {"batch": [], "queued": [], "depth": []}
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        "m",
        Recorder(),
        max_batch_size=2,
        max_wait_s=0.01,
        on_batch=lambda size, s: seen["batch"].append(size),
        on_queued=seen["queued"].append,
        on_depth=seen["depth"].append,
    )
    batcher.start()
    await asyncio.gather(*(batcher.submit(i, 5) for i in range(4)))
    await batcher.close()
    assert sum(seen["batch"]) == 4 and len(seen["queued"]) == 4
    assert max(seen["depth"]) >= 1 and seen["depth"][-1] == 0


async def test_admission_sheds_what_would_miss_its_deadline() -> None:
    handler = Recorder(delay_s=0.2)
    batcher = await started(handler, max_batch_size=1, max_wait_s=0.0, queue_size=100)
    batcher.check_admission(5, timeout_s=0.1)  # no batch measured yet: nothing to predict from
    await batcher.submit(1, 5)  # one batch measured: ~0.2 s per batch of one
    assert batcher.predicted_wait_s(1) == 0  # idle: its batch starts at once
    assert 0.15 < batcher.predicted_wait_s(2) < 1.0  # the second item's batch starts after the first's
    batcher.check_admission(1, timeout_s=0.01)
    with pytest.raises(QueueFull, match="overloaded"):
        batcher.check_admission(3, timeout_s=0.3)  # two batches in front of the last: ~0.4 s
    with pytest.raises(TooLarge, match="holds 100"):  # could never be queued: 413, not a 429 to retry
        batcher.check_admission(101, timeout_s=100)
    await batcher.close()


async def test_no_history_of_slow_batches_locks_an_idle_model_out() -> None:
    """Whatever the batches before took, an idle model admits what it can start at once: the
    prediction that refused requests while work was queued must not outlive that work."""
    handler = Recorder(delay_s=0.0)
    batcher = await started(handler, max_batch_size=4, max_wait_s=0.0, queue_size=16)
    for last_batch_s in (0.0, 0.5, 35.0, 1e6):
        batcher._last_batch_s = last_batch_s  # as a batch of that length would have left it
        for n_items in (1, 2, 4):  # at most one batch: it starts as soon as it is queued
            batcher.check_admission(n_items, timeout_s=0.001)
        assert await batcher.submit(7, 5)  # and it is answered
        batcher._last_batch_s = last_batch_s
        if last_batch_s > 0.01:
            with pytest.raises(QueueFull, match="overloaded"):
                batcher.check_admission(5, timeout_s=0.001)  # a second batch would wait for the first
    await batcher.close()

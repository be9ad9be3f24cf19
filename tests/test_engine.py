"""The engine without HTTP: the same admission, deadlines, drain and cancellation for every task."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from app.engine.engine import Engine
from app.errors import DeadlineExceeded, InvalidInput, ModelNotFound, NotReady, QueueFull, TooLarge
from app.tasks import TASKS
from tests.apptools import make_settings
from tests.tasktools import EXAMPLES, write_every_task

TASK_NAMES = list(TASKS)


def example(task: str) -> tuple[str, Callable[[], Any]]:
    return EXAMPLES[task].model, EXAMPLES[task].request


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_every_task(tmp_path_factory.mktemp("engine-models"))


def test_every_task_has_a_contract_example() -> None:
    assert sorted(EXAMPLES) == sorted(TASKS)


@asynccontextmanager
async def running(models_dir: Path, **overrides: Any) -> AsyncIterator[Engine]:
    engine = Engine(make_settings(models_dir, **{"warmup": False, "memory_trim_idle_s": 0, **overrides}))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.mark.parametrize("task", TASK_NAMES)
async def test_every_task_answers_through_one_method(models_dir: Path, task: str) -> None:
    name, request = example(task)
    async with running(models_dir) as engine:
        assert {card["task"] for card in engine.cards()} == set(TASKS)
        output = await engine.infer(name, task, request())
        assert EXAMPLES[task].check(output)
        assert output.timing.batch_size >= 1 and output.timing.inference_ms > 0
        other = next(t for t in TASKS if t != task)
        with pytest.raises(ModelNotFound, match="serves task"):
            await engine.infer(name, other, request())
        with pytest.raises(ModelNotFound, match="not served"):
            await engine.infer("nope", task, request())


@pytest.mark.parametrize("task", TASK_NAMES)
async def test_a_full_queue_sheds_before_the_body_is_read(models_dir: Path, task: str) -> None:
    name, request = example(task)
    async with running(models_dir, queue_size=1, max_wait_ms=10_000) as engine:
        holder = engine.batchers[name].announce()  # the batch waits for it: the first request stays queued
        first = asyncio.ensure_future(engine.infer(name, task, request()))
        while engine.batchers[name].depth == 0:
            await asyncio.sleep(0.01)
        read = []

        async def reader() -> Any:
            read.append(True)
            return request()

        with pytest.raises(QueueFull):
            await engine.infer(name, task, reader)
        assert not read  # refused before its body was read
        engine.batchers[name].max_wait_s = 0.0  # translate and generate always wait: not 10 s more here
        holder.close()
        await first


@pytest.mark.parametrize("task", TASK_NAMES)
async def test_admission_refuses_what_would_only_wait_past_its_deadline(models_dir: Path, task: str) -> None:
    name, request = example(task)
    async with running(models_dir, request_timeout_s=5.0) as engine:
        await engine.infer(name, task, request())  # a batch ran: the engine knows how long one takes
        batcher = engine.batchers[name]
        batcher._last_batch_s, batcher._busy = 10.0, True  # pretend a 10 s batch is running
        with pytest.raises(QueueFull, match="overloaded"):
            await engine.infer(name, task, request())
        assert engine.metrics.rejected.labels(name, "queue_full")._value.get() == 1
        batcher._busy = False  # it ended: the model is idle, and a stale 10 s estimate locks nobody out
        assert EXAMPLES[task].check(await engine.infer(name, task, request()))


@pytest.mark.parametrize("task", [t for t in TASK_NAMES if EXAMPLES[t].many is not None])
async def test_more_items_than_the_queue_holds_is_413_at_once(models_dir: Path, task: str) -> None:
    """It could never be queued, however long the client waited: 413, not a 429 to retry."""
    many = EXAMPLES[task].many
    assert many is not None
    async with running(models_dir, queue_size=1) as engine:
        with pytest.raises(TooLarge, match="holds 1"):
            await engine.infer(EXAMPLES[task].model, task, many(2))
        assert engine.idle


@pytest.mark.parametrize("task", TASK_NAMES)
async def test_the_deadline_runs_from_arrival(models_dir: Path, task: str) -> None:
    name, request = example(task)
    async with running(models_dir, request_timeout_s=0.3) as engine:

        async def slow_reader() -> Any:  # a client sending its body slowly spends the deadline
            await asyncio.sleep(0.4)
            return request()

        with pytest.raises(DeadlineExceeded, match="before it could be queued"):
            await engine.infer(name, task, slow_reader)
        assert engine.batchers[name].stats.items == 0  # never reached the model


@pytest.mark.parametrize("task", TASK_NAMES)
async def test_a_queued_item_is_answered_504_at_its_deadline(models_dir: Path, task: str) -> None:
    name, request = example(task)
    async with running(models_dir, request_timeout_s=0.5, max_wait_ms=5000) as engine:
        holder = engine.batchers[name].announce()  # keeps the batch waiting up to 5 s
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            await engine.infer(name, task, request())
        assert time.perf_counter() - started < 1.5  # the timer answered, not the batch 5 s later
        holder.close()


@pytest.mark.parametrize("task", TASK_NAMES)
async def test_a_request_admitted_before_the_drain_is_answered(models_dir: Path, task: str) -> None:
    """SIGTERM while a body is still arriving: the request was accepted, so it is answered."""
    name, request = example(task)
    async with running(models_dir) as engine:
        body_started = asyncio.Event()

        async def reader() -> Any:
            body_started.set()
            await asyncio.sleep(0.2)
            return request()

        accepted = asyncio.ensure_future(engine.infer(name, task, reader))
        await body_started.wait()
        engine.begin_drain()
        assert not engine.idle
        with pytest.raises(NotReady, match="shutting down"):
            await engine.infer(name, task, request())
        await accepted  # answered, not refused
        assert engine.idle


@pytest.mark.parametrize("task", TASK_NAMES)
async def test_a_caller_that_leaves_costs_nothing_more(models_dir: Path, task: str) -> None:
    name, request = example(task)
    async with running(models_dir, max_wait_ms=5000) as engine:
        holder = engine.batchers[name].announce()
        waiting = asyncio.ensure_future(engine.infer(name, task, request()))
        while engine.batchers[name].depth == 0:
            await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        holder.close()
        await engine.infer(name, task, request())  # the next batch runs without the cancelled item
        assert engine.batchers[name].stats.cancelled == 1 and engine.idle


@pytest.mark.parametrize("task", TASK_NAMES)
async def test_validation_errors_come_from_the_task(models_dir: Path, task: str) -> None:
    async with running(models_dir) as engine:
        with pytest.raises(InvalidInput):
            await engine.infer(EXAMPLES[task].model, task, EXAMPLES[task].invalid())
        assert engine.idle and engine.batchers[EXAMPLES[task].model].stats.items == 0


async def test_stream_yields_tokens_then_the_answer(models_dir: Path) -> None:
    async with running(models_dir) as engine:
        kinds = [event.kind async for event in engine.stream("tinylm", "generate", EXAMPLES["generate"].request())]
        assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") >= 1
        with pytest.raises(InvalidInput, match="does not stream"):
            async for _ in engine.stream("tiny", "classify", EXAMPLES["classify"].request()):
                pass
        assert engine.idle

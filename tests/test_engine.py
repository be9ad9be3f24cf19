"""The engine without HTTP: the same admission, deadlines, drain and cancellation for every task."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.engine.engine import Engine
from app.errors import DeadlineExceeded, InvalidInput, ModelNotFound, NotReady, QueueFull
from app.tasks.classify.messages import ClassifyOutput, ClassifyRequest, EncodedImage
from app.tasks.generate.messages import GenerateOutput, GenerateRequest
from tests.apptools import make_settings
from tests.imagetools import png_bytes, write_tiny_model
from tests.texttools import write_tiny_lm

# One request per task, and what its answer must look like.
TASKS: dict[str, tuple[str, Callable[[], Any]]] = {
    "classify": ("tiny", lambda: ClassifyRequest([EncodedImage(png_bytes(np.full((40, 40, 3), 90, np.uint8)))])),
    "generate": ("tinylm", lambda: GenerateRequest("The man worked as", max_new_tokens=2, temperature=0)),
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("engine-models")
    write_tiny_model(folder)
    write_tiny_lm(folder)
    return folder


@asynccontextmanager
async def running(models_dir: Path, **overrides: Any) -> AsyncIterator[Engine]:
    engine = Engine(make_settings(models_dir, **{"warmup": False, "memory_trim_idle_s": 0, **overrides}))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.mark.parametrize("task", list(TASKS))
async def test_both_tasks_answer_through_one_method(models_dir: Path, task: str) -> None:
    name, request = TASKS[task]
    async with running(models_dir) as engine:
        assert {card["task"] for card in engine.cards()} == {"classify", "generate"}
        output = await engine.infer(name, task, request())
        if task == "classify":
            assert isinstance(output, ClassifyOutput) and len(output.results) == 1
            assert abs(sum(t.weight for t in output.results[0].transforms) - 1) < 1e-5
        else:
            assert isinstance(output, GenerateOutput) and len(output.tokens) >= 1
        assert output.timing.batch_size == 1 and output.timing.inference_ms > 0
        with pytest.raises(ModelNotFound, match="serves task"):
            await engine.infer(name, "generate" if task == "classify" else "classify", request())
        with pytest.raises(ModelNotFound, match="not served"):
            await engine.infer("nope", task, request())


@pytest.mark.parametrize("task", list(TASKS))
async def test_a_full_queue_sheds_before_the_body_is_read(models_dir: Path, task: str) -> None:
    name, request = TASKS[task]
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
        holder.close()
        await first


@pytest.mark.parametrize("task", list(TASKS))
async def test_admission_refuses_what_would_only_wait_past_its_deadline(models_dir: Path, task: str) -> None:
    name, request = TASKS[task]
    async with running(models_dir, request_timeout_s=5.0) as engine:
        await engine.infer(name, task, request())  # a batch ran: the engine knows how long one takes
        engine.batchers[name]._last_batch_s = 10.0  # pretend batches take 10 s
        with pytest.raises(QueueFull, match="overloaded"):
            await engine.infer(name, task, request())
        assert engine.metrics.rejected.labels(name, "queue_full")._value.get() == 1


@pytest.mark.parametrize("task", list(TASKS))
async def test_the_deadline_runs_from_arrival(models_dir: Path, task: str) -> None:
    name, request = TASKS[task]
    async with running(models_dir, request_timeout_s=0.3) as engine:

        async def slow_reader() -> Any:  # a client sending its body slowly spends the deadline
            await asyncio.sleep(0.4)
            return request()

        with pytest.raises(DeadlineExceeded, match="before it could be queued"):
            await engine.infer(name, task, slow_reader)
        assert engine.batchers[name].stats.items == 0  # never reached the model


@pytest.mark.parametrize("task", list(TASKS))
async def test_a_queued_item_is_answered_504_at_its_deadline(models_dir: Path, task: str) -> None:
    name, request = TASKS[task]
    async with running(models_dir, request_timeout_s=0.5, max_wait_ms=5000) as engine:
        holder = engine.batchers[name].announce()  # keeps the batch waiting up to 5 s
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            await engine.infer(name, task, request())
        assert time.perf_counter() - started < 1.5  # the timer answered, not the batch 5 s later
        holder.close()


@pytest.mark.parametrize("task", list(TASKS))
async def test_a_request_admitted_before_the_drain_is_answered(models_dir: Path, task: str) -> None:
    """SIGTERM while a body is still arriving: the request was accepted, so it is answered."""
    name, request = TASKS[task]
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


@pytest.mark.parametrize("task", list(TASKS))
async def test_a_caller_that_leaves_costs_nothing_more(models_dir: Path, task: str) -> None:
    name, request = TASKS[task]
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


async def test_validation_errors_come_from_the_task(models_dir: Path) -> None:
    async with running(models_dir) as engine:
        with pytest.raises(InvalidInput, match="method 'magic'"):
            await engine.infer("tiny", "classify", ClassifyRequest([np.zeros((8, 8, 3), np.uint8)], method="magic"))
        with pytest.raises(InvalidInput, match="temperature"):
            await engine.infer("tinylm", "generate", GenerateRequest("The man", temperature=-1))


async def test_stream_yields_tokens_then_the_answer(models_dir: Path) -> None:
    async with running(models_dir) as engine:
        kinds = [event.kind async for event in engine.stream("tinylm", "generate", TASKS["generate"][1]())]
        assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") >= 1
        with pytest.raises(InvalidInput, match="does not stream"):
            async for _ in engine.stream("tiny", "classify", TASKS["classify"][1]()):
                pass
        assert engine.idle

"""Dynamic batching: an asyncio queue per model whose batches leave full, or ``max_wait`` after
their FIRST item arrived (the timer starts at the oldest item, as in Ray Serve's batching), or
at once when no other request is on its way.

"On its way" is what the engine announces (``announce``): a request being read, decoded or
preprocessed. Waiting only pays when such a request will join the batch; with none announced
(a lone client), the batch leaves immediately instead of adding ``max_wait`` to its latency.

Guarantees, each tested:
* bounded: ``submit`` refuses with ``QueueFull`` (429) when ``queue_size`` items wait;
* deadlines: an item still queued at its deadline is answered ``DeadlineExceeded`` (504);
* cancelled items (client gone) are dropped before the forward pass;
* every accepted item gets exactly one answer: a result, its own error, or the batch's error;
* ``close()`` refuses new items and answers everything already accepted before returning.

The handler runs in a worker thread so the event loop keeps accepting and decoding while
the model computes; the next batch fills during the current forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from app import tracing
from app.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull, TooLarge

from .priority import lower_this_thread

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("equiserve.batcher")


@dataclass(frozen=True)
class BatchInfo:
    """How an item was served: handed back with its result."""

    queue_s: float
    inference_s: float
    batch_size: int
    trace: Any = None  # the batch span's context when traced (app.tracing): the request's queue span links to it


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued: float
    deadline: float
    request_id: str = ""
    timer: asyncio.TimerHandle | None = None  # answers 504 at the deadline if still queued
    trace: Any = None  # the span context of the item's request when traced (app.tracing)


class Arrival:
    """A request announced to a batcher while it is read and preprocessed; ``close`` (once,
    idempotent) when its items are queued or it failed."""

    def __init__(self, batcher: DynamicBatcher | None) -> None:
        self._batcher = batcher  # None: nothing to tell (e.g. an unknown model, refused later)
        self.started = time.perf_counter()  # the request's deadline counts from here
        if batcher is not None:
            batcher._arriving += 1

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher._arriving -= 1
            self._batcher._wakeup.set()  # a waiting batch may now leave
            self._batcher = None


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    expired: int = 0
    cancelled: int = 0
    failed_batches: int = 0


# Hooks the engine plugs metrics into; the batcher itself knows nothing of Prometheus.
OnBatch = Callable[[int, float], None]  # (batch size, inference seconds)
OnQueued = Callable[[float], None]  # seconds an item waited
OnDepth = Callable[[int], None]


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        name: str,
        handler: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        queue_size: int = 512,
        executor: Executor | None = None,
        on_batch: OnBatch | None = None,
        on_queued: OnQueued | None = None,
        on_depth: OnDepth | None = None,
        always_wait: bool = False,
        compute_nice: int = 0,
        span_attributes: dict[str, Any] | None = None,
    ) -> None:
        """``always_wait``: batches wait ``max_wait_s`` even with nothing announced, for callers
        that cannot announce requests early (the text route gets its body already parsed).
        ``compute_nice``: the nice increment of the thread running the handler (see
        ``app.engine.priority``). ``span_attributes``: of each batch's span when traced."""
        self.name = name
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._executor = executor or ThreadPoolExecutor(
            1, thread_name_prefix=f"infer-{name}", initializer=lower_this_thread, initargs=(compute_nice,)
        )
        self._owns_executor = executor is None
        self._queue: deque[_Pending[T]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._busy = False
        self._arriving = 0  # announced requests not yet queued
        self._always_wait = always_wait
        self._on_batch, self._on_queued, self._on_depth = on_batch, on_queued, on_depth
        self.stats = BatcherStats()
        self._last_batch_s = 0.0
        self._span_attributes = {"equiserve.model": name, **(span_attributes or {})}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop taking items; answer every accepted one; then stop the loop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._busy

    # -- submitting ------------------------------------------------------------------------
    def retry_after_s(self) -> float:
        """A hint for 429s: how long the queue in front needs to drain, at least 1 s."""
        batches_ahead = self.depth / self.max_batch_size + 1
        return max(1.0, round(batches_ahead * max(self._last_batch_s, self.max_wait_s), 1))

    def submit_nowait(self, item: T, timeout_s: float, request_id: str = "", trace: Any = None) -> asyncio.Future:
        """Queue ``item``; the returned future resolves to ``(result, BatchInfo)``.

        Raises ``QueueFull`` or ``NotReady`` at once, so a request with several images can
        check them all before any of its work is queued.
        """
        if self._closing:
            raise NotReady(f"model {self.name!r} is shutting down")
        if self._task is None:
            raise NotReady(f"model {self.name!r} is not started")
        if len(self._queue) >= self.queue_size:
            raise QueueFull(f"model {self.name!r} has {self.queue_size} images queued", self.retry_after_s())
        now = time.perf_counter()
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future, now, now + timeout_s, request_id, trace=trace)
        pending.timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, pending)
        self._queue.append(pending)
        self._report_depth()
        self._wakeup.set()
        return future

    def announce(self) -> Arrival:
        """Tell the batcher a request is on its way, so a batch may wait (``max_wait``) for it."""
        return Arrival(self)

    def free_slots(self) -> int:
        return self.queue_size - len(self._queue)

    def predicted_wait_s(self, n_items: int) -> float:
        """How long the last of ``n_items`` more would wait for its batch to *start* (where its
        deadline ends), from the last batch's duration (0 before any): the batch in flight, then
        every batch ahead of the one that takes its last item. An idle model predicts 0, so one
        slow batch long ago can never refuse a request the model could start at once."""
        batches_ahead = -(-(len(self._queue) + n_items) // self.max_batch_size) - 1  # ceil, less its own
        return (batches_ahead + int(self._busy)) * self._last_batch_s

    def check_admission(self, n_items: int, timeout_s: float) -> None:
        """Refuse ``n_items`` that could never be queued (``TooLarge``, 413), that do not fit the
        queue now (``QueueFull``, 429), or that would only wait past their deadline (429):
        shedding at once beats accepting and answering 504."""
        if n_items > self.queue_size:
            raise TooLarge(
                f"{n_items} items in one request; the queue of {self.name!r} holds {self.queue_size} "
                "(EQUISERVE_QUEUE_SIZE)"
            )
        if self.free_slots() < n_items:
            raise QueueFull(f"the queue of {self.name!r} is full", self.retry_after_s())
        wait = self.predicted_wait_s(n_items)
        if wait > timeout_s:
            raise QueueFull(
                f"model {self.name!r} is overloaded: a new request would wait ~{wait:.1f} s, over its "
                f"{timeout_s:g} s deadline",
                self.retry_after_s(),
            )

    async def submit(self, item: T, timeout_s: float, request_id: str = "") -> tuple[R, BatchInfo]:
        return await self.submit_nowait(item, timeout_s, request_id)

    # -- the loop --------------------------------------------------------------------------
    def _report_depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._queue))

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _expire(self, pending: _Pending[T]) -> None:
        """The deadline passed while the item was still queued: answer 504 now, not when a
        batch would have reached it (that can be a whole batch later)."""
        pending.timer = None  # the fired handle refers back to ``pending``: no cycle to keep its item alive
        if pending.future.done():
            return  # cancelled (client gone): dropped when a batch reaches it
        try:
            self._queue.remove(pending)
        except ValueError:  # already taken into a batch: it will be answered
            return
        self._answer_expired(pending, time.perf_counter())
        self._report_depth()

    def _answer_expired(self, pending: _Pending[T], now: float) -> None:
        self.stats.expired += 1
        pending.future.set_exception(
            DeadlineExceeded(f"waited {now - pending.enqueued:.3f} s in the queue of {self.name!r}")
        )

    def _take_batch(self) -> list[_Pending[T]]:
        """Pop up to ``max_batch_size`` live items, answering expired and skipping cancelled ones."""
        batch: list[_Pending[T]] = []
        now = time.perf_counter()
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if pending.timer is not None:
                pending.timer.cancel()
            if pending.future.done():  # cancelled: the client went away
                self.stats.cancelled += 1
                continue
            if now > pending.deadline:  # its timer has not fired yet (a busy event loop)
                self._answer_expired(pending, now)
                continue
            batch.append(pending)
        self._report_depth()
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wait(None)
                continue
            # The batch's timer started when its oldest item arrived, not when we looked. It only
            # waits while another request is on its way: otherwise nothing would join it.
            oldest = self._queue[0].enqueued
            while len(self._queue) < self.max_batch_size and not self._closing and self._worth_waiting():
                remaining = oldest + self.max_wait_s - time.perf_counter()
                if remaining <= 0:
                    break
                await self._wait(remaining)
            batch = self._take_batch()
            if not batch:
                continue
            self._busy = True
            try:
                await self._serve(loop, batch)
            finally:
                self._busy = False

    def _worth_waiting(self) -> bool:
        return self._always_wait or self._arriving > 0

    async def _serve(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T]]) -> None:
        span = tracing.batch_span(batch, self._span_attributes) if tracing.enabled else None
        failed: Exception | None = None
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.handler, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"handler returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # the whole batch failed: each of its items gets the error
            failed = exc
            self.stats.failed_batches += 1
            ids = ",".join(p.request_id for p in batch if p.request_id)
            log.exception("batch of %d failed on model %s (request ids: %s)", len(batch), self.name, ids)
            results = [InferenceFailed(f"inference failed on model {self.name!r}: {type(exc).__name__}")] * len(batch)
        inference_s = time.perf_counter() - started
        batch_trace = None
        if span is not None:
            span.end(failed)
            batch_trace = span.context
        self._last_batch_s = inference_s
        self.stats.batches += 1
        self.stats.items += len(batch)
        if self._on_batch is not None:
            self._on_batch(len(batch), inference_s)
        for pending, result in zip(batch, results, strict=True):
            queue_s = started - pending.enqueued
            if self._on_queued is not None:
                self._on_queued(queue_s)
            if pending.future.done():  # cancelled while computing: nobody to answer
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result((result, BatchInfo(queue_s, inference_s, len(batch), batch_trace)))

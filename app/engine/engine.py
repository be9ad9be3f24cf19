"""The engine: every served model, its batcher, and one way in for every task — no HTTP.

The HTTP layer, the CLI, the benchmarks and a Ray Serve replica all call ``Engine.infer``
(or ``Engine.stream``) with a task's request object. For each request the engine, whatever
the task:

1. refuses it while loading or draining (``NotReady``), for an unknown model or one of
   another task (``ModelNotFound``), or when its model's queue could not take it in time
   (``QueueFull``, before any of its bytes are read);
2. announces it to the model's batcher (a forming batch may wait for it), reads its body
   when the caller passes a reader, and lets the model ``split`` it into pieces;
3. ``prepare``s the pieces (decode, tokenize) in the preprocessing pool, checks admission
   again with the real item count and the time left of its deadline (which runs from its
   arrival), and queues all its items at once, or none;
4. awaits their results (per-item deadline timers answer 504 on time; a cancelled caller's
   items are dropped before the pass, or told to stop), records the metrics, and has the
   model ``respond``.

Every accepted request gets exactly one answer; draining waits for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from app import tracing
from app.config import Settings, default_cache_dir
from app.errors import (
    DeadlineExceeded,
    EngineError,
    InferenceFailed,
    ModelLoadError,
    ModelNotFound,
    NotReady,
    QueueFull,
)
from app.metrics import Metrics
from app.repository import list_models, model_dir
from app.runtime.memory import release_free_memory
from app.runtime.pixel_budget import PixelBudget
from app.tasks import read_spec, task_class
from app.tasks.base import LoadOptions, ServedModel, Timing

from .batcher import Arrival, BatchInfo, DynamicBatcher
from .load_times import LoadTimes
from .priority import lower_this_thread

log = logging.getLogger("equiserve.engine")

RequestSource = Any  # a task's request object, or an async callable that reads one (an HTTP body)


@dataclass(frozen=True)
class StreamEvent:
    kind: str  # "start" | "token" | ... (what the task emits) | "done" | "error"
    data: Any = None  # a token; the output for "done"; the exception for "error"


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings.max_batch_size)
        self.models: dict[str, ServedModel] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.ready = False
        self.draining = False
        self._preprocess = ThreadPoolExecutor(
            settings.preprocess_threads,
            thread_name_prefix="preprocess",
            initializer=lower_this_thread,
            initargs=(settings.compute_nice,),
        )
        # Every image model of this engine (one per process) reserves decoded pixels from it.
        self.decoded_pixels = PixelBudget(settings.max_decoded_pixels, on_change=self.metrics.decoded_pixels.set)
        self.metrics.before_exposition.append(self.decoded_pixels.refresh)
        self._inflight = 0
        self._memory_task: asyncio.Task | None = None
        self._start_task: asyncio.Task | None = None
        self.loaded: list[str] = []  # what GET /health/ready reports while loading
        self.pending: list[str] = []
        self.load_times = LoadTimes((settings.onnx_cache_dir or default_cache_dir()) / "load-times.json")
        self.load_error: BaseException | None = None  # a background start that failed (start_in_background)

    # -- lifecycle -----------------------------------------------------------------------------
    def model_names_to_load(self) -> list[str]:
        return self.settings.models or list_models(self.settings.models_dir)

    def load(self) -> None:
        """Load and warm up every configured model (blocking; call from a thread). Fails on
        the first bad one.

        Without ``EQUISERVE_MODELS``, entries marked ``optional`` whose weights would need a
        download (a CLIP tag not yet cached, a language model not installed) are skipped;
        naming them loads (downloads) them.
        """
        if self.settings.torch_threads is not None:
            import torch

            # Process-wide. On a shared or CPU-limited host fewer threads than cores can be much faster.
            torch.set_num_threads(self.settings.torch_threads)
        requested = self.settings.models is not None
        options = LoadOptions.from_settings(self.settings, self.decoded_pixels)
        self.pending = list(self.model_names_to_load())
        total = len(self.pending)
        for number, name in enumerate(list(self.pending), 1):
            last = self.load_times.previous.get(name)
            took = f"; it took {last:.1f} s last time" if last else ""
            log.info("loading %s (%d of %d)%s", name, number, total, took)
            self.load_times.start(name)
            started = time.perf_counter()
            folder = model_dir(self.settings.models_dir, name)
            spec = read_spec(folder)
            kind = task_class(spec.task)
            if not requested and spec.optional and not kind.weights_are_local(spec):
                log.info("skipping %s: its weights are not on this machine (EQUISERVE_MODELS=%s fetches them)",
                         name, name)  # fmt: skip
                self.pending.remove(name)
                continue
            model = kind.load(folder, spec, options)  # the spec read above: the entry is read once
            if self.settings.warmup:
                model.warmup(model.max_batch_size(self.settings.max_batch_size))
            self.models[name] = model
            self.load_times.done(name, time.perf_counter() - started)
            self.pending.remove(name)
            self.loaded.append(name)
            log.info(
                "loaded %s (%s %s on %s, group %s = %d copies, λ %s, %s/%s, batches of up to %d) in %.1f s",
                name, spec.task, model.backbone_name, model.runtime, spec.group, len(model.transforms),
                "trained" if model.lambda_trained else "uniform", model.device, str(model.dtype).removeprefix("torch."),
                model.max_batch_size(self.settings.max_batch_size), time.perf_counter() - started,
            )  # fmt: skip
        if not self.models:
            raise ModelLoadError(f"no model to serve in {self.settings.models_dir}")

    async def start(self) -> None:
        # A thread of its own, at the compute threads' priority: the onnxruntime and OpenMP
        # thread pools created while loading inherit it (app.engine.priority).
        loader = ThreadPoolExecutor(
            1, thread_name_prefix="load", initializer=lower_this_thread, initargs=(self.settings.compute_nice,)
        )
        try:
            await asyncio.get_running_loop().run_in_executor(loader, self.load)
        finally:
            loader.shutdown(wait=False)  # cancelled while loading (a stop): never block the loop on it
        for name, model in self.models.items():
            self.batchers[name] = self._make_batcher(model)
            self.batchers[name].start()
            card = model.card()
            self.metrics.model_info.labels(name, card["backbone"], card["group"], card["device"], card["dtype"]).set(1)
        if self.settings.memory_trim_idle_s > 0:
            self._memory_task = asyncio.get_running_loop().create_task(self._release_memory_when_idle())
        self.ready = True

    def start_in_background(self) -> asyncio.Task:
        """``start`` as a task of the running loop, so that a server answers its health routes
        while the models load (live 200, ready 503 with the progress). A failure is logged and
        kept in ``load_error`` (the server then exits non-zero); it never raises here."""

        async def run() -> None:
            try:
                await self.start()
            except Exception as exc:
                self.load_error = exc
                log.error("loading the models failed: %s", exc)
            else:
                log.info("ready: serving %s", ", ".join(self.models))

        self._start_task = asyncio.get_running_loop().create_task(run(), name="engine-start")
        return self._start_task

    def _make_batcher(self, model: ServedModel) -> DynamicBatcher:
        m, name = self.metrics, model.name
        return DynamicBatcher(
            name,
            model,
            max_batch_size=model.max_batch_size(self.settings.max_batch_size),
            max_wait_s=self.settings.max_wait_ms / 1000,
            queue_size=self.settings.queue_size,
            on_batch=lambda size, seconds: (
                m.batch_size.labels(name).observe(size),
                m.inference_duration.labels(name).observe(seconds),
            ),
            on_queued=m.queue_duration.labels(name).observe,
            on_depth=m.queue_depth.labels(name).set,
            always_wait=model.always_wait,
            compute_nice=self.settings.compute_nice,
            span_attributes=tracing.model_attributes(model),  # plain values: nothing of OpenTelemetry
        )

    def _release_memory(self) -> bool:
        for model in self.models.values():
            model.release_memory()  # runtimes' own arenas first, then the heap
        return release_free_memory()

    async def _release_memory_when_idle(self) -> None:
        """Once traffic stops, hand the memory it freed back to the OS (see app.runtime.memory).

        Checked every ``memory_trim_idle_s``: releases once per quiet spell that followed work,
        i.e. when no batch ran during a whole interval and nothing is in flight. (Being idle
        at the instant of the check is not enough: a steady client at concurrency 1 leaves
        the engine idle for a moment between its requests.)"""
        trimmed_at = last_seen = 0
        while True:
            await asyncio.sleep(self.settings.memory_trim_idle_s)
            batches = sum(b.stats.batches for b in self.batchers.values())
            quiet = batches == last_seen
            last_seen = batches
            if quiet and batches != trimmed_at and self.idle:
                trimmed_at = batches
                released = await asyncio.to_thread(self._release_memory)
                log.debug("idle after %d batches: malloc_trim released memory: %s", batches, released)

    def begin_drain(self) -> None:
        """Readiness turns 503 and new requests are refused; accepted ones are still answered."""
        self.draining = True

    @property
    def idle(self) -> bool:
        return not self._inflight and all(b.idle for b in self.batchers.values())

    async def stop(self) -> None:
        self.draining = True
        if self._start_task is not None and not self._start_task.done():
            # Stopped while loading: the loader thread finishes the model it is on (a thread
            # cannot be interrupted) and the process exits; no batcher is started.
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._start_task
        if self._memory_task is not None:
            self._memory_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._memory_task
        for batcher in self.batchers.values():
            await batcher.close()
        self._preprocess.shutdown(wait=True)
        self.ready = False

    # -- what is served ------------------------------------------------------------------------
    def cards(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: one card per served model."""
        return [model.card() for model in self.models.values()]

    def model(self, name: str, task: str | None = None) -> ServedModel:
        """The served model ``name``; with ``task``, it must serve that task."""
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not served; see GET /v1/models")
        if task is not None and model.task != task:
            raise ModelNotFound(f"model {name!r} serves task {model.task!r}, not {task!r}; see GET /v1/models")
        return model

    def check_accepting(self) -> None:
        if self.draining:
            raise NotReady("the server is shutting down")
        if not self.ready:
            raise NotReady("the models are still loading")

    # -- requests ------------------------------------------------------------------------------
    async def infer(self, name: str, task: str, request: RequestSource, *, request_id: str = "") -> Any:
        """Serve one request of ``task`` on model ``name`` and return the model's answer.

        ``request``: the task's request object, or an async callable returning it: it is
        then called only once the request is admitted (an HTTP body is not read when the
        request would be refused anyway).
        """
        trace = tracing.request_trace(name, task, request_id) if tracing.enabled else tracing.OFF
        with trace:
            async with self._admitted(name, task, trace) as (model, batcher, arrival):
                request, futures, items = await self._enqueue(model, batcher, arrival, request, request_id, None, trace)
                return await self._answer(model, request, futures, items, request_id, trace)

    async def stream(
        self, name: str, task: str, request: RequestSource, *, request_id: str = ""
    ) -> AsyncIterator[StreamEvent]:
        """Serve one request whose model streams (``ServedModel.streams``): events as the
        batch makes them, then ``done`` (the answer) or ``error``. Errors before the request's
        batch starts (refusal, validation, queue, deadline) raise from the first ``__anext__``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def emit(kind: str, data: Any) -> None:  # called from the inference thread
            loop.call_soon_threadsafe(events.put_nowait, StreamEvent(kind, data))

        trace = tracing.request_trace(name, task, request_id) if tracing.enabled else tracing.OFF
        with trace:  # the request's span lasts as long as its stream
            async with self._admitted(name, task, trace) as (model, batcher, arrival):
                request, futures, items = await self._enqueue(model, batcher, arrival, request, request_id, emit, trace)
                answer = asyncio.ensure_future(self._answer(model, request, futures, items, request_id, trace))
                # Events are scheduled with call_soon_threadsafe before the batcher resolves the
                # futures on the loop, so "done" always comes after the last token.
                answer.add_done_callback(
                    lambda done: events.put_nowait(
                        StreamEvent("error", NotReady("cancelled")) if done.cancelled()
                        else StreamEvent("error", done.exception()) if done.exception() is not None
                        else StreamEvent("done", done.result())
                    )
                )  # fmt: skip
                try:
                    first = await events.get()
                    if first.kind == "error":
                        raise first.data
                    yield first
                    while first.kind not in ("done", "error"):
                        first = await events.get()
                        yield first
                finally:
                    answer.cancel()  # no-op once answered; the caller left: stop the work

    @contextlib.asynccontextmanager
    async def _admitted(
        self, name: str, task: str, trace: tracing.RequestTrace | tracing.Off
    ) -> AsyncIterator[tuple[ServedModel, DynamicBatcher, Arrival]]:
        """Admission at arrival, and the request's in-flight span (drain waits for it)."""
        with trace.step("equiserve.admission"):
            self.check_accepting()
            model = self.model(name, task)
            trace.describe(model)
            batcher = self.batchers[name]
            arrival = batcher.announce()  # from here on a forming batch may wait for this request
            try:
                # Shed before reading anything: under overload, parsing and decoding what will be
                # refused anyway starves the accepted requests and makes the 429 itself slow.
                self._admit(batcher, 1, arrival)
            except BaseException:
                arrival.close()
                raise
        self._inflight += 1
        self.metrics.inflight.inc()
        try:
            yield model, batcher, arrival
        finally:
            arrival.close()
            self._inflight -= 1
            self.metrics.inflight.dec()

    async def _enqueue(
        self,
        model: ServedModel,
        batcher: DynamicBatcher,
        arrival: Arrival,
        request: RequestSource,
        request_id: str,
        emit: Callable[[str, Any], None] | None,
        trace: tracing.RequestTrace | tracing.Off,
    ) -> tuple[Any, list[asyncio.Future], list[Any]]:
        if callable(request):
            with trace.step("equiserve.read"):
                request = await request()
        trace.describe(model, request)
        with trace.step("equiserve.prepare"):
            pieces = model.split(request)
            self._admit(batcher, len(pieces), arrival)  # shed before preparing
            if model.prepare_in_pool:
                loop = asyncio.get_running_loop()
                items = list(
                    await asyncio.gather(*(loop.run_in_executor(self._preprocess, model.prepare, p) for p in pieces))
                )
            else:
                items = [model.prepare(piece) for piece in pieces]
            if emit is not None:
                for item in items:
                    model.stream(item, emit)
            # Check again and queue all items with no await in between: all or none are accepted.
            time_left = self._admit(batcher, len(items), arrival)
        trace.queued()
        futures = [batcher.submit_nowait(item, time_left, request_id, trace.span_context) for item in items]
        arrival.close()  # queued: nothing more of this request is on its way
        return request, futures, items

    def _admit(self, batcher: DynamicBatcher, n_items: int, arrival: Arrival) -> float:
        """Refuse ``n_items`` that the queue could not serve before the request's deadline,
        which runs from its arrival (reading and decoding count); returns the time left."""
        time_left = self.settings.request_timeout_s - (time.perf_counter() - arrival.started)
        if time_left <= 0:
            self.metrics.rejected.labels(batcher.name, "deadline_exceeded").inc()
            raise DeadlineExceeded(
                f"the request spent its {self.settings.request_timeout_s:g} s deadline before it could be queued"
            )
        try:
            batcher.check_admission(n_items, time_left)
        except QueueFull:
            self.metrics.rejected.labels(batcher.name, "queue_full").inc()
            raise
        return time_left

    async def _answer(
        self,
        model: ServedModel,
        request: Any,
        futures: Sequence[asyncio.Future],
        items: list[Any],
        request_id: str,
        trace: tracing.RequestTrace | tracing.Off,
    ) -> Any:
        try:
            try:
                answers: list[tuple[Any, BatchInfo]] = await asyncio.gather(*futures)
            except BaseException as exc:
                trace.waited(0.0, (), exc)  # its queue span ends with what ended the wait (504, cancelled)
                raise
        except asyncio.CancelledError:  # the caller went away: drop what has not run, stop the rest
            self._abandon(model, futures, items)
            raise
        except EngineError as exc:
            self._abandon(model, futures, items)
            self.metrics.rejected.labels(model.name, exc.code).inc()
            raise
        except Exception as exc:
            self._abandon(model, futures, items)
            log.exception("request %s failed on %s", request_id, model.name)
            raise InferenceFailed(f"inference failed on model {model.name!r}: {type(exc).__name__}") from exc
        results = [result for result, _ in answers]
        infos = [info for _, info in answers]
        trace.waited(max(i.queue_s for i in infos), [i.trace for i in infos])
        with trace.step("equiserve.combine"):
            for result in results:  # the diagnostics a task's results carry (app.tasks.base.Diagnosed)
                entropy = getattr(result, "lambda_net_entropy", None)
                selected = getattr(result, "selected_transform", None)
                if entropy is not None:
                    self.metrics.lambda_entropy.labels(model.name).observe(entropy)
                if selected is not None:
                    self.metrics.selected_transform.labels(model.name, selected).inc()
            timing = Timing(
                queue_ms=max(i.queue_s for i in infos) * 1000,
                inference_ms=max(i.inference_s for i in infos) * 1000,
                batch_size=max(i.batch_size for i in infos),
            )
            trace.answered(results, timing.batch_size)
            return model.respond(request, results, timing)

    @staticmethod
    def _abandon(model: ServedModel, futures: Sequence[asyncio.Future], items: list[Any]) -> None:
        for future, item in zip(futures, items, strict=True):
            future.cancel()
            model.cancel(item)
        # The error about to be raised keeps this request's frames, and with them this list, until
        # the garbage collector breaks its cycle (error -> traceback -> frame -> futures -> error):
        # the items (decoded crops, reserved pixels) go as soon as the batcher lets go of them.
        items.clear()

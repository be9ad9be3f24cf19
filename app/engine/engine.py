"""The engine: loaded models, their batchers, and ``classify`` — usable without HTTP.

The HTTP layer, the benchmarks and the CLI all call ``Engine.classify`` with decoded images
(``uint8 [H, W, 3]`` arrays); the engine validates what depends on the model, preprocesses
in a thread pool, queues each image in its model's batcher and gathers the answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.backbones.factory import weights_are_local
from app.config import Settings
from app.equivariance import Method
from app.metrics import Metrics

from .batcher import Arrival, BatchInfo, DynamicBatcher
from .errors import (
    DeadlineExceeded,
    EngineError,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    NotReady,
    QueueFull,
    TooLarge,
)
from .memory import release_free_memory
from .priority import lower_this_thread
from .registry import LoadedModel, ModelLoadError, list_models, load_model, model_dir, read_spec
from .runner import ImageItem, ImageResult, ImageRunner

log = logging.getLogger("equiserve.engine")

DEFAULT_TOP_K = 5  # capped at the number of labels


@dataclass(frozen=True)
class ClassifyOutput:
    model: str
    method: Method
    group: str
    results: list[ImageResult]
    queue_s: float  # the longest wait among the request's images
    inference_s: float  # the longest batch among them
    batch_size: int  # the largest batch among them


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings.max_batch_size)
        self.models: dict[str, LoadedModel] = {}
        self.runners: dict[str, ImageRunner] = {}
        self.batchers: dict[str, DynamicBatcher[ImageItem, ImageResult]] = {}
        self.ready = False
        self.draining = False
        self._preprocess = ThreadPoolExecutor(
            settings.preprocess_threads,
            thread_name_prefix="preprocess",
            initializer=lower_this_thread,
            initargs=(settings.compute_nice,),
        )
        self._inflight = 0
        self._memory_task: asyncio.Task | None = None
        # Engines served beside this one (the text engine): drained with it, and idle only together.
        self.companions: list[Any] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def model_names_to_load(self) -> list[str]:
        return self.settings.models or list_models(self.settings.models_dir)

    def load(self) -> None:
        """Load every configured model (blocking; call from a thread). Fails on the first bad one.

        Without ``EQUISERVE_MODELS``, entries marked ``optional`` whose weights would need a
        download (a CLIP tag not yet cached) are skipped; naming them loads (downloads) them.
        """
        if self.settings.torch_threads is not None:
            # Process-wide. On a shared or CPU-limited host fewer threads than cores can be much faster.
            torch.set_num_threads(self.settings.torch_threads)
        requested = self.settings.models is not None
        language_models = 0
        for name in self.model_names_to_load():
            started = time.perf_counter()
            spec = read_spec(model_dir(self.settings.models_dir, name))
            if spec.task == "generate":  # a language model: the text engine loads it
                language_models += 1
                continue
            if not requested and spec.optional and not weights_are_local(spec.backbone.family, **spec.backbone.options):
                log.info("skipping %s: its weights are not on this machine (EQUISERVE_MODELS=%s fetches them)",
                         name, name)  # fmt: skip
                continue
            loaded = load_model(
                self.settings.models_dir,
                name,
                self.settings.device,
                self.settings.dtype,
                self.settings.channels_last,
                runtime=self.settings.runtime,
                onnx_cache_dir=self.settings.onnx_cache_dir,
                threads=self.settings.torch_threads,
            )
            runner = ImageRunner(loaded)
            if self.settings.warmup:
                runner.warmup(self.settings.max_batch_size)
            self.models[name] = loaded
            self.runners[name] = runner
            seconds = time.perf_counter() - started
            log.info(
                "loaded %s (%s on %s, group %s, %s/%s) in %.1f s",
                name, loaded.backbone.name, loaded.runtime, loaded.spec.group, loaded.device, loaded.dtype, seconds,
            )  # fmt: skip
        if not self.models and not language_models:
            raise ModelLoadError(f"no model to serve in {self.settings.models_dir}")

    async def start(self) -> None:
        # A thread of its own, at the compute threads' priority: the onnxruntime and OpenMP
        # thread pools created while loading inherit it (app.engine.priority).
        with ThreadPoolExecutor(
            1, thread_name_prefix="load", initializer=lower_this_thread, initargs=(self.settings.compute_nice,)
        ) as loader:
            await asyncio.get_running_loop().run_in_executor(loader, self.load)
        for name, loaded in self.models.items():
            self.batchers[name] = self._make_batcher(name)
            self.batchers[name].start()
            self.metrics.model_info.labels(
                name,
                loaded.backbone.name,
                loaded.spec.group,
                loaded.device.type,
                str(loaded.dtype).removeprefix("torch."),
            ).set(1)
        if self.settings.memory_trim_idle_s > 0:
            self._memory_task = asyncio.get_running_loop().create_task(self._release_memory_when_idle())
        self.ready = True

    def _release_memory(self) -> bool:
        for loaded in self.models.values():
            loaded.backbone.release_memory()  # runtimes' own arenas first, then the heap
        return release_free_memory()

    async def _release_memory_when_idle(self) -> None:
        """Once traffic stops, hand the memory it freed back to the OS (see app.engine.memory).

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

    def _make_batcher(self, name: str) -> DynamicBatcher[ImageItem, ImageResult]:
        m = self.metrics
        return DynamicBatcher(
            name,
            self.runners[name],
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000,
            queue_size=self.settings.queue_size,
            on_batch=lambda size, seconds: (
                m.batch_size.labels(name).observe(size),
                m.inference_duration.labels(name).observe(seconds),
            ),
            on_queued=m.queue_duration.labels(name).observe,
            on_depth=m.queue_depth.labels(name).set,
            compute_nice=self.settings.compute_nice,
        )

    def begin_drain(self) -> None:
        """Readiness turns 503 and new requests are refused; accepted ones are still answered."""
        self.draining = True
        for companion in self.companions:
            companion.begin_drain()

    @property
    def idle(self) -> bool:
        busy = self._inflight or not all(b.idle for b in self.batchers.values())
        return not busy and all(c.idle for c in self.companions)

    async def stop(self) -> None:
        self.draining = True
        if self._memory_task is not None:
            self._memory_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._memory_task
        for batcher in self.batchers.values():
            await batcher.close()
        self._preprocess.shutdown(wait=True)
        self.ready = False

    # -- requests --------------------------------------------------------------------------
    def get_model(self, name: str) -> LoadedModel:
        if name not in self.models:
            raise ModelNotFound(f"model {name!r} is not served; see GET /v1/models")
        return self.models[name]

    def check_accepting(self) -> None:
        if self.draining:
            raise NotReady("the server is shutting down")
        if not self.ready:
            raise NotReady("the models are still loading")

    def validate(
        self, loaded: LoadedModel, n_images: int, method: str | None, top_k: int | None, labels: Sequence[str] | None
    ) -> tuple[Method, int, tuple[str, ...] | None]:
        """Everything about a request that depends on its model; raises with the right status."""
        s = self.settings
        if n_images < 1:
            raise InvalidInput("send at least one image")
        if n_images > s.max_images:
            raise TooLarge(f"{n_images} images in one request; the limit is {s.max_images} (EQUISERVE_MAX_IMAGES)")
        chosen = loaded.spec.resolve_method(method)
        label_set: tuple[str, ...] | None = None
        if labels is not None:
            if not loaded.zero_shot:
                raise InvalidInput(f"{loaded.name} has a fixed label set; 'labels' is only for zero-shot models")
            if len(labels) > s.max_labels:
                raise TooLarge(f"{len(labels)} labels; the limit is {s.max_labels} (EQUISERVE_MAX_LABELS)")
            cleaned = tuple(label.strip() for label in labels)
            if not cleaned or any(not label for label in cleaned):
                raise InvalidInput("labels must be non-empty strings")
            if any(len(label) > s.max_label_chars for label in cleaned):
                raise InvalidInput(f"a label is longer than {s.max_label_chars} characters")
            if len(set(cleaned)) != len(cleaned):
                raise InvalidInput("labels must be distinct")
            label_set = cleaned
        elif loaded.zero_shot and not loaded.backbone.labels:
            raise InvalidInput(f"{loaded.name} is zero-shot: send 'labels'")
        num_labels = len(label_set) if label_set is not None else len(loaded.backbone.labels)
        if top_k is None:
            top_k = min(DEFAULT_TOP_K, num_labels)
        if not 1 <= top_k <= num_labels:
            raise InvalidInput(f"top_k must be between 1 and {num_labels}")
        return chosen, top_k, label_set

    async def classify(
        self,
        model: str,
        images: Sequence[np.ndarray],
        *,
        method: str | None = None,
        top_k: int | None = None,
        labels: Sequence[str] | None = None,
        request_id: str = "",
        arrival: Arrival | None = None,
    ) -> ClassifyOutput:
        """Classify ``images`` with ``model``. ``arrival``: from ``announce`` when the caller
        announced the request earlier (before reading its body); otherwise it is announced here."""
        arrival = arrival or self.announce(model)
        try:
            self.check_accepting()
            loaded = self.get_model(model)
            chosen, top_k, label_set = self.validate(loaded, len(images), method, top_k, labels)
            self._inflight += 1
            self.metrics.inflight.inc()
            try:
                return await self._classify(loaded, images, chosen, top_k, label_set, request_id, arrival)
            finally:
                self._inflight -= 1
                self.metrics.inflight.dec()
        finally:
            arrival.close()

    def announce(self, model: str) -> Arrival:
        """A request for ``model`` is on its way: its batch may wait (``max_wait_ms``) for it.
        ``close`` the result when the request is queued or failed."""
        batcher = self.batchers.get(model)
        return batcher.announce() if batcher is not None else Arrival(None)

    def check_capacity(self, model: str, n_images: int, arrival: Arrival | None = None) -> None:
        """Raise ``QueueFull`` (429) now if ``n_images`` for ``model`` would be refused later:
        lets the HTTP layer shed a request before it spends CPU decoding its images."""
        if model in self.batchers:
            self._admit(self.batchers[model], n_images, self._time_left(arrival))

    def _time_left(self, arrival: Arrival | None) -> float:
        """Seconds left of the request's deadline, which runs from its arrival: reading and
        decoding count, so an accepted request is answered within ``request_timeout_s``."""
        spent = time.perf_counter() - arrival.started if arrival is not None else 0.0
        return self.settings.request_timeout_s - spent

    def _admit(self, batcher: DynamicBatcher[ImageItem, ImageResult], n_images: int, time_left: float) -> None:
        if time_left <= 0:
            self.metrics.rejected.labels(batcher.name, "deadline_exceeded").inc()
            raise DeadlineExceeded(
                f"the request spent its {self.settings.request_timeout_s:g} s deadline before it could be queued"
            )
        try:
            batcher.check_admission(n_images, time_left)
        except QueueFull:
            self.metrics.rejected.labels(batcher.name, "queue_full").inc()
            raise

    async def _classify(
        self,
        loaded: LoadedModel,
        images: Sequence[np.ndarray],
        method: Method,
        top_k: int,
        labels: tuple[str, ...] | None,
        request_id: str,
        arrival: Arrival,
    ) -> ClassifyOutput:
        batcher = self.batchers[loaded.name]
        runner = self.runners[loaded.name]
        self._admit(batcher, len(images), self._time_left(arrival))  # shed before preprocessing
        loop = asyncio.get_running_loop()
        pixels = await asyncio.gather(*(loop.run_in_executor(self._preprocess, runner.preprocess, im) for im in images))
        # Check again and queue all images with no await in between: all or none are accepted.
        time_left = self._time_left(arrival)
        self._admit(batcher, len(images), time_left)
        self.check_accepting()
        futures = [batcher.submit_nowait(ImageItem(p, method, top_k, labels), time_left, request_id) for p in pixels]
        arrival.close()  # queued: nothing more of this request is on its way
        try:
            answers: list[tuple[ImageResult, BatchInfo]] = await asyncio.gather(*futures)
        except asyncio.CancelledError:  # the client went away: drop what has not run yet
            for future in futures:
                future.cancel()
            raise
        except EngineError as exc:
            for future in futures:
                future.cancel()
            self.metrics.rejected.labels(loaded.name, exc.code).inc()
            raise
        except Exception as exc:
            for future in futures:
                future.cancel()
            log.exception("request %s failed on %s", request_id, loaded.name)
            raise InferenceFailed(f"inference failed on model {loaded.name!r}: {type(exc).__name__}") from exc
        results = [result for result, _ in answers]
        for result in results:
            self.metrics.lambda_entropy.labels(loaded.name).observe(result.lambda_entropy)
            if result.selected_transform is not None:
                self.metrics.selected_transform.labels(loaded.name, result.selected_transform).inc()
        infos = [info for _, info in answers]
        return ClassifyOutput(
            model=loaded.name,
            method=method,
            group=loaded.spec.group,
            results=results,
            queue_s=max(i.queue_s for i in infos),
            inference_s=max(i.inference_s for i in infos),
            batch_size=max(i.batch_size for i in infos),
        )

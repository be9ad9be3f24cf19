"""The text engine: language models, their batchers, ``generate`` and ``stream`` — no HTTP.

It mirrors ``Engine`` (the image engine): loads every ``task: generate`` entry of the model
repository once, validates requests against the model's limits (413/422), queues each
request in the model's ``DynamicBatcher`` (429/503/504 as the batcher gives) and reports the
same Prometheus metrics (with ``endpoint="generate"`` from the middleware). A batch is
decoded to its end by ``TextRunner`` (static batching: requests that arrive meanwhile form
the next batch). ``stream`` hands out tokens as the runner produces them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.backbones.causal_lm import weights_are_local
from app.config import Settings
from app.equivariance import Method
from app.metrics import Metrics

from .batcher import BatchInfo, DynamicBatcher
from .errors import EngineError, InferenceFailed, InvalidInput, ModelNotFound, NotReady, QueueFull, TooLarge
from .generation import GenerationRequest, GenerationResult, TextModel, TextRunner, TokenEvent, load_text_model
from .registry import ModelLoadError, list_models, model_dir, read_spec

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("equiserve.text_engine")

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerateOutput:
    model: str
    method: Method
    group: str
    transforms: list[str]
    relaxed: bool
    seed: int
    temperature: float
    top_k: int
    result: GenerationResult
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass(frozen=True)
class StreamEvent:
    kind: str  # "start" | "token" | "done" | "error"
    token: TokenEvent | None = None
    output: GenerateOutput | None = None
    error: BaseException | None = None


class TextStream:
    """Events of one streamed request. ``started()`` returns once its batch began decoding,
    or raises the error that ended it before (429/503/504 come back as real HTTP statuses)."""

    def __init__(self, future: asyncio.Future, request: GenerationRequest) -> None:
        self.future = future
        self.request = request
        self.queue: asyncio.Queue[StreamEvent] = asyncio.Queue()

    async def started(self) -> None:
        event = await self.queue.get()
        if event.kind == "error":
            assert event.error is not None
            raise event.error
        if event.kind != "start":  # pragma: no cover - the runner always starts first
            self.queue.put_nowait(event)

    async def events(self) -> AsyncIterator[StreamEvent]:
        while True:
            event = await self.queue.get()
            yield event
            if event.kind in ("done", "error"):
                return

    def cancel(self) -> None:
        """The client went away: stop decoding this request (its batch goes on)."""
        self.request.cancelled.set()
        self.future.cancel()


class TextEngine:
    def __init__(self, settings: Settings, metrics: Metrics | None = None, parent: Engine | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings.max_batch_size)
        self.parent = parent
        self.models: dict[str, TextModel] = {}
        self.runners: dict[str, TextRunner] = {}
        self.batchers: dict[str, DynamicBatcher[GenerationRequest, GenerationResult]] = {}
        self.ready = False
        self.draining = False
        self._inflight = 0
        if parent is not None:
            parent.companions.append(self)

    # -- lifecycle -----------------------------------------------------------------------------
    def model_names_to_load(self) -> list[str]:
        names = self.settings.models or list_models(self.settings.models_dir)
        return [n for n in names if read_spec(model_dir(self.settings.models_dir, n)).task == "generate"]

    def batch_size(self, model: TextModel) -> int:
        return model.limits.max_batch_size or self.settings.max_batch_size

    def load(self) -> None:
        requested = self.settings.models is not None
        for name in self.model_names_to_load():
            started = time.perf_counter()
            spec = read_spec(model_dir(self.settings.models_dir, name))
            if not requested and spec.optional and not weights_are_local(**spec.backbone.options):
                log.info("skipping %s: its weights are not on this machine (EQUISERVE_MODELS=%s fetches them)",
                         name, name)  # fmt: skip
                continue
            model = load_text_model(self.settings.models_dir, name, self.settings.device, self.settings.dtype)
            runner = TextRunner(model)
            if self.settings.warmup:
                runner.warmup(self.batch_size(model))  # a full batch, every method, two tokens
            self.models[name] = model
            self.runners[name] = runner
            log.info(
                "loaded %s (%s, group %s = %d copies, λ %s, %s) in %.1f s",
                name, model.lm.name, model.spec.group, model.group.order,
                "trained" if model.lambda_trained else "uniform", model.device, time.perf_counter() - started,
            )  # fmt: skip
        if not self.models and self.parent is not None and not self.parent.models:
            raise ModelLoadError(f"no model to serve in {self.settings.models_dir}")

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        m = self.metrics
        for name, model in self.models.items():
            self.batchers[name] = DynamicBatcher(
                name,
                self.runners[name],
                max_batch_size=self.batch_size(model),
                max_wait_s=self.settings.max_wait_ms / 1000,
                queue_size=self.settings.queue_size,
                on_batch=lambda size, seconds, name=name: (
                    m.batch_size.labels(name).observe(size),
                    m.inference_duration.labels(name).observe(seconds),
                ),
                on_queued=m.queue_duration.labels(name).observe,
                on_depth=m.queue_depth.labels(name).set,
                # Generating takes seconds: a lone request dispatched at once would hold back
                # the ones arriving just after it for a whole generation, so batches always wait.
                always_wait=True,
                compute_nice=self.settings.compute_nice,
            )
            self.batchers[name].start()
            m.model_info.labels(
                name, model.lm.name, model.spec.group, model.device.type, str(model.dtype).removeprefix("torch.")
            ).set(1)
        self.ready = True

    def begin_drain(self) -> None:
        self.draining = True

    @property
    def idle(self) -> bool:
        return self._inflight == 0 and all(b.idle for b in self.batchers.values())

    async def stop(self) -> None:
        self.draining = True
        for batcher in self.batchers.values():
            await batcher.close()
        self.ready = False

    # -- requests --------------------------------------------------------------------------------
    def check_accepting(self) -> None:
        if self.draining or (self.parent is not None and self.parent.draining):
            raise NotReady("the server is shutting down")
        if not self.ready:
            raise NotReady("the models are still loading")

    def get_model(self, name: str) -> TextModel:
        if name not in self.models:
            if self.parent is not None and name in self.parent.models:
                raise ModelNotFound(f"model {name!r} classifies images; generate needs a language model")
            raise ModelNotFound(f"model {name!r} is not served; see GET /v1/models")
        return self.models[name]

    def prepare(
        self,
        model: TextModel,
        prompt: str,
        *,
        max_new_tokens: int | None,
        method: str | None,
        temperature: float | None,
        top_k: int | None,
        seed: int | None,
        relaxed: bool | None,
    ) -> GenerationRequest:
        """Everything about a request that depends on its model; raises with the right status."""
        limits = model.limits
        if len(prompt) > limits.max_prompt_chars:
            raise TooLarge(f"the prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}")
        chosen = model.spec.resolve_method(method)
        new_tokens = limits.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        if new_tokens < 1:
            raise InvalidInput("max_new_tokens must be at least 1")
        if new_tokens > limits.max_new_tokens:
            raise TooLarge(f"max_new_tokens {new_tokens} is over this model's limit of {limits.max_new_tokens}")
        temperature = limits.default_temperature if temperature is None else temperature
        if not 0 <= temperature <= 100:
            raise InvalidInput("temperature must be between 0 (greedy) and 100")
        top_k = limits.default_top_k if top_k is None else top_k
        if not 0 <= top_k <= model.lm.vocab_size:
            raise InvalidInput(f"top_k must be between 0 (no limit) and {model.lm.vocab_size}")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") & MAX_SEED
        elif not 0 <= seed <= MAX_SEED:
            raise InvalidInput(f"seed must be between 0 and {MAX_SEED}")
        ids = model.lm.encode(prompt)
        if not ids:
            raise InvalidInput("the prompt is empty after tokenization")
        if len(ids) > limits.max_prompt_tokens:
            raise TooLarge(f"the prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}")
        if len(ids) + new_tokens > model.lm.max_positions:
            raise TooLarge(f"prompt + max_new_tokens is over the model's context of {model.lm.max_positions} tokens")
        relaxed = model.text_group.relaxed if relaxed is None else relaxed
        return GenerationRequest(ids, new_tokens, chosen, temperature, top_k, seed, relaxed)

    def _submit(self, model: TextModel, request: GenerationRequest, request_id: str) -> asyncio.Future:
        self.check_accepting()
        batcher = self.batchers[model.name]
        try:
            return batcher.submit_nowait(request, self.settings.request_timeout_s, request_id)
        except QueueFull:
            self.metrics.rejected.labels(model.name, "queue_full").inc()
            raise

    def _output(self, model: TextModel, request: GenerationRequest, answer: tuple[Any, BatchInfo]) -> GenerateOutput:
        result, info = answer
        if result.lambda_entropy is not None:
            self.metrics.lambda_entropy.labels(model.name).observe(result.lambda_entropy)
        if result.selected_transform is not None:
            self.metrics.selected_transform.labels(model.name, result.selected_transform).inc()
        return GenerateOutput(
            model=model.name,
            method=request.method,
            group=model.spec.group,
            transforms=model.transforms,
            relaxed=request.relaxed,
            seed=request.seed,
            temperature=request.temperature,
            top_k=request.top_k,
            result=result,
            queue_s=info.queue_s,
            inference_s=info.inference_s,
            batch_size=info.batch_size,
        )

    def _failed(self, model: TextModel, exc: BaseException, request_id: str) -> BaseException:
        if isinstance(exc, EngineError):
            self.metrics.rejected.labels(model.name, exc.code).inc()
            return exc
        log.error("request %s failed on %s: %r", request_id, model.name, exc)
        return InferenceFailed(f"inference failed on model {model.name!r}: {type(exc).__name__}")

    async def generate(self, name: str, prompt: str, *, request_id: str = "", **options: Any) -> GenerateOutput:
        """Generate for one prompt; ``options`` are ``prepare``'s keywords (None = the model's default)."""
        self.check_accepting()
        model = self.get_model(name)
        request = self.prepare(model, prompt, **{k: options.get(k) for k in PREPARE_KEYS})
        self._inflight += 1
        self.metrics.inflight.inc()
        try:
            future = self._submit(model, request, request_id)
            try:
                answer = await future
            except asyncio.CancelledError:  # the client went away: stop decoding it
                request.cancelled.set()
                future.cancel()
                raise
            except Exception as exc:
                raise self._failed(model, exc, request_id) from exc
            return self._output(model, request, answer)
        finally:
            self._inflight -= 1
            self.metrics.inflight.dec()

    async def stream(self, name: str, prompt: str, *, request_id: str = "", **options: Any) -> TextStream:
        """Queue one prompt and return its event stream; validation and queue errors raise here."""
        self.check_accepting()
        model = self.get_model(name)
        request = self.prepare(model, prompt, **{k: options.get(k) for k in PREPARE_KEYS})
        loop = asyncio.get_running_loop()
        holder: list[TextStream] = []

        def put(event: StreamEvent) -> None:
            loop.call_soon_threadsafe(holder[0].queue.put_nowait, event)

        request.on_start = lambda: put(StreamEvent("start"))
        request.on_token = lambda token: put(StreamEvent("token", token=token))
        future = self._submit(model, request, request_id)
        stream = TextStream(future, request)
        holder.append(stream)
        self._inflight += 1
        self.metrics.inflight.inc()

        def finished(done: asyncio.Future) -> None:
            self._inflight -= 1
            self.metrics.inflight.dec()
            if done.cancelled():
                stream.queue.put_nowait(StreamEvent("error", error=NotReady("cancelled")))
                return
            exc = done.exception()
            if exc is not None:
                stream.queue.put_nowait(StreamEvent("error", error=self._failed(model, exc, request_id)))
            else:
                stream.queue.put_nowait(StreamEvent("done", output=self._output(model, request, done.result())))

        # Token events are scheduled with call_soon_threadsafe before the batcher resolves the
        # future on the loop, so "done" always comes after the last token.
        future.add_done_callback(finished)
        return stream

    # -- what GET /v1/models shows -----------------------------------------------------------
    def cards(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "task": "generate",
                "backbone": model.lm.name,
                "group": model.spec.group,
                "transforms": model.transforms,
                "methods": [m.value for m in model.spec.methods],
                "default_method": model.spec.default_method.value,
                "num_labels": None,
                "zero_shot": False,
                "lambda_trained": model.lambda_trained,
                "device": model.device.type,
                "dtype": str(model.dtype).removeprefix("torch."),
                "runtime": "torch",
                "input_size": None,
                "description": model.spec.description,
            }
            for name, model in self.models.items()
        ]


PREPARE_KEYS = ("max_new_tokens", "method", "temperature", "top_k", "seed", "relaxed")

"""OpenTelemetry tracing: one trace per request, off unless configured (docs/tracing.md).

Off (the default), nothing of OpenTelemetry is imported and the hot path pays one boolean
check (``enabled``) per step: the engine then uses ``OFF``, whose steps are shared no-ops, and
the HTTP edge makes no span at all. On (``setup``: an OTLP endpoint in the standard
``OTEL_EXPORTER_OTLP_*`` env vars, ``OTEL_TRACES_EXPORTER``, or ``EQUISERVE_TRACING=on``), a
request to an inference route is traced as::

    POST /v1/models/{name}/{task}     the server span (app.api.middleware); W3C traceparent in
      equiserve.request               the engine's span of the request (also without HTTP)
        equiserve.admission           refused or admitted at arrival, before its body is read
        equiserve.read                the body read and parsed into the task's request
        equiserve.prepare             split, decoded / tokenized, admitted again with its items
        equiserve.queue               its items' wait for their batch; linked to the batch span(s)
        equiserve.combine             its items' results made into its answer (``respond``)
      equiserve.answer                the answer serialised (app.api.inference)
    equiserve.batch                   ONE span per fused pass (all |G| copies of all its items),
                                      child of its oldest sampled request, linked to every one

The batch span belongs to one trace but serves many requests, so it links to each request's
span and each request's queue span links back to it: from any request's trace one finds its
batch and from the batch every request it served. Only this module imports OpenTelemetry;
the layers above ask it for spans (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer

# The one check of the hot path: read as ``tracing.enabled`` (a module attribute, so that
# ``setup`` and ``shutdown`` turn it for every importer).
enabled = False
_provider: TracerProvider | None = None
_tracer: Tracer | None = None

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
# What ``python -m app serve`` needs installed when tracing is configured (the ``tracing`` extra).
MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
TRACE_ID_HEADER = b"x-trace-id"
NO_SPAN: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def wanted(mode: str = "auto", environ: Mapping[str, str] | None = None) -> bool:
    """Whether tracing is configured: ``mode`` is ``EQUISERVE_TRACING``; ``auto`` follows the
    standard env vars (an OTLP endpoint or an exporter named), ``on`` traces to OTLP's default
    endpoint (http://localhost:4318) unless they say otherwise. ``OTEL_SDK_DISABLED=true`` and
    ``OTEL_TRACES_EXPORTER=none`` turn it off whatever the mode, as they do for any OTel SDK."""
    env = os.environ if environ is None else environ
    if mode == "off" or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return mode == "on" or bool(exporter) or any(env.get(name) for name in ENDPOINT_VARS)


def setup(
    mode: str = "auto", *, exporter: SpanExporter | None = None, attributes: Mapping[str, Any] | None = None
) -> bool:
    """Start tracing if configured (or ``exporter`` is given: tests pass the SDK's in-memory one,
    whose spans are then exported as each ends); returns whether it is on. The SDK reads the
    rest of the standard env vars itself: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
    (default service name: equiserve), ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_BSP_*`` and the
    OTLP exporter's endpoint, headers and timeout. Raises ``ValueError`` on what it cannot do."""
    global enabled, _provider, _tracer
    if exporter is None and not wanted(mode):
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create(dict(attributes or {}))
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "equiserve"}))
    provider = TracerProvider(resource=resource)  # its sampler from OTEL_TRACES_SAMPLER
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_exporter_from_env()))  # off the request path
    shutdown()  # a previous set-up (tests): its spans are flushed first
    _provider, _tracer = provider, provider.get_tracer("equiserve")
    enabled = True
    return True


def require(mode: str = "auto") -> bool:
    """Whether tracing is configured; if it is, stop with one line naming the ``tracing`` extra
    when that is not installed (``serve --ray`` checks in the driver, before any replica starts)."""
    if not wanted(mode):
        return False
    from app.command_line import require_extra

    require_extra("tracing", "tracing (EQUISERVE_TRACING / OTEL_EXPORTER_OTLP_*)", *MODULES)
    return True


def start(mode: str = "auto", attributes: Mapping[str, Any] | None = None) -> bool:
    """A server's start (``serve``, a Ray replica): ``setup`` if configured, and without the
    ``tracing`` extra installed one line that says which extra to install, not a traceback."""
    if not require(mode):
        return False
    try:
        return setup(mode, attributes=attributes)
    except ValueError as exc:
        raise SystemExit(f"tracing: {exc}") from None


def _exporter_from_env() -> SpanExporter:
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r}: equiserve exports traces with otlp, console or none")
    for name in PROTOCOL_VARS:
        protocol = os.environ.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            raise ValueError(f"{name}={protocol!r}: equiserve exports OTLP over http/protobuf only")
        if protocol:
            break
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT


def shutdown() -> None:
    """Export what is buffered and turn tracing off (a server's exit, a test's end)."""
    global enabled, _provider, _tracer
    enabled = False
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def _record_error(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    if isinstance(exc, GeneratorExit | _cancelled()):
        span.set_attribute("equiserve.cancelled", True)  # the caller left: not the server's error
        return
    span.record_exception(exc)
    code = getattr(exc, "code", None)
    span.set_status(Status(StatusCode.ERROR, f"{code}: {exc}" if isinstance(code, str) else type(exc).__name__))


def _cancelled() -> type[BaseException]:
    import asyncio

    return asyncio.CancelledError


@contextlib.contextmanager
def _ended(span: Span) -> Iterator[Span]:
    """``span`` ended on leaving, with the error that left it. Never made the current span: the
    engine's steps run in async generators (streams), where a context attached in one task could
    be detached in another."""
    try:
        yield span
    except BaseException as exc:
        _record_error(span, exc)
        raise
    finally:
        span.end()


# -- the HTTP edge -----------------------------------------------------------------------------


class ServerSpan:
    """The server span of one request to an inference route (REST) or call (gRPC), from its W3C
    ``traceparent`` (and ``tracestate``) when it has one; current while the request runs
    (``attach``/``detach`` in the serving task), so the engine's spans are its children."""

    def __init__(self, name: str, attributes: Mapping[str, Any], carrier: Mapping[str, str]) -> None:
        from opentelemetry import context
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        assert _tracer is not None
        parent = TraceContextTextMapPropagator().extract(carrier)
        self.span = _tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes))
        self._context = context
        self._token: Any = context.attach(set_span_in_context(self.span, parent))
        span_context = self.span.get_span_context()
        self.trace_id = format(span_context.trace_id, "032x") if span_context.trace_flags.sampled else None

    @classmethod
    def http(cls, method: str, route: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> ServerSpan:
        carrier = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers}
        attributes = {"http.request.method": method, "http.route": route, "url.path": path}
        return cls(f"{method} {route}", attributes, carrier)

    @classmethod
    def grpc(cls, service: str, method: str, metadata: Iterable[tuple[str, Any]]) -> ServerSpan:
        carrier = {key.lower(): value for key, value in metadata if isinstance(value, str)}  # -bin keys are bytes
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        return cls(f"{service}/{method}", attributes, carrier)

    def set(self, **attributes: Any) -> None:
        self.span.set_attributes(attributes)

    def end(self, status: int, exc: BaseException | None = None, **attributes: Any) -> None:
        """``status``: the HTTP status of the answer (a gRPC call's: its REST equivalent), whose
        5xx mark the span an error; ``attributes`` are set first (a gRPC call's own status code)."""
        from opentelemetry.trace import Status, StatusCode

        self._context.detach(self._token)
        self.span.set_attribute("http.response.status_code", status)
        if attributes:
            self.span.set_attributes(attributes)
        if exc is not None:
            self.span.record_exception(exc)
        if status >= 500 or exc is not None:  # a 4xx is the client's: not an error of this server span
            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end()


def span_here(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A child of the current span (the server span in a route), ended on leaving."""
    assert _tracer is not None
    return _ended(_tracer.start_span(name, attributes=attributes))


# -- the engine --------------------------------------------------------------------------------


class RequestTrace:
    """One request's spans in the engine: ``equiserve.request`` (a child of the current span: the
    server span under HTTP, else a root) and its steps. The engine holds ``OFF`` instead when
    tracing is off or the request is not sampled."""

    def __init__(self, model: str, task: str, request_id: str) -> None:
        from opentelemetry.trace import set_span_in_context

        assert _tracer is not None
        attributes = {"equiserve.model": model, "equiserve.task": task}
        if request_id:
            attributes["equiserve.request_id"] = request_id
        self.span = _tracer.start_span("equiserve.request", attributes=attributes)
        self.context = set_span_in_context(self.span)
        self.span_context: SpanContext | None = self.span.get_span_context()
        self.queued_ns = 0

    def __enter__(self) -> RequestTrace:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            _record_error(self.span, exc)
        self.span.end()

    def step(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        assert _tracer is not None
        return _ended(_tracer.start_span(name, context=self.context, attributes=attributes))

    def set(self, **attributes: Any) -> None:
        self.span.set_attributes({f"equiserve.{key}": value for key, value in attributes.items() if value is not None})

    def describe(self, model: Any, request: Any = None) -> None:
        """The model's attributes once it is known; the method once the request is read."""
        if request is None:
            self.span.set_attributes(model_attributes(model))
            return
        method = getattr(request, "method", None) or getattr(model.spec, "default_method", None)
        if method is not None:
            self.span.set_attribute("equiserve.method", str(getattr(method, "value", method)))

    def answered(self, results: Sequence[Any], batch_size: int) -> None:
        """What its batches did: the largest batch of its items, and the copy equizero chose
        (``selected_transform``; comma-separated, one per item, for a request of several)."""
        self.span.set_attribute("equiserve.batch_size", batch_size)
        selected = [getattr(result, "selected_transform", None) for result in results]
        if any(name is not None for name in selected):
            self.span.set_attribute("equiserve.selected_transform", ",".join(str(name or "") for name in selected))

    def queued(self) -> None:
        self.queued_ns = time.time_ns()

    def waited(self, queue_s: float, batches: Sequence[Any], exc: BaseException | None = None) -> None:
        """The queue span, written once its wait is known: from queueing to the start of the batch
        that took its last item (or to now, when it was answered without one: 504, cancelled),
        linked to each batch span that served its items."""
        from opentelemetry.trace import Link

        assert _tracer is not None
        end = self.queued_ns + int(queue_s * 1e9) if exc is None else time.time_ns()
        unique = {batch.span_id: batch for batch in batches if batch is not None}  # a SpanContext is not hashable
        links = [Link(batch, {"equiserve.link": "batch"}) for batch in unique.values()]
        span = _tracer.start_span("equiserve.queue", context=self.context, links=links, start_time=self.queued_ns)
        if exc is not None:
            _record_error(span, exc)
        span.end(end_time=max(end, self.queued_ns))


class Off:
    """``RequestTrace``'s no-op twin: what the engine holds when nothing is traced."""

    span_context = None

    def __enter__(self) -> Off:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def step(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[None]:
        return NO_SPAN

    def set(self, **attributes: Any) -> None:
        return None

    def describe(self, model: Any, request: Any = None) -> None:
        return None

    def answered(self, results: Sequence[Any], batch_size: int) -> None:
        return None

    def queued(self) -> None:
        return None

    def waited(self, queue_s: float, batches: Sequence[Any], exc: BaseException | None = None) -> None:
        return None


OFF = Off()


def model_attributes(model: Any) -> dict[str, Any]:
    """A served model's span attributes: its name, task, group and |G| (the copies of each item)."""
    return {
        "equiserve.model": model.name,
        "equiserve.task": model.task,
        "equiserve.group": model.spec.group,
        "equiserve.group_order": len(model.transforms),
        "equiserve.backbone": model.backbone_name,
    }


def request_trace(model: str, task: str, request_id: str) -> RequestTrace | Off:
    """The engine's spans for one request (call only when ``enabled``); ``OFF`` when unsampled."""
    trace = RequestTrace(model, task, request_id)
    return trace if trace.span.is_recording() else OFF


class BatchSpan:
    """``equiserve.batch``: one fused pass, in the trace of its oldest sampled request and linked
    to the span of every sampled request it serves."""

    def __init__(self, requests: Sequence[tuple[Any, str]], attributes: Mapping[str, Any]) -> None:
        from opentelemetry.trace import Link, NonRecordingSpan, set_span_in_context

        assert _tracer is not None
        links = [
            Link(ctx, {"equiserve.request_id": request_id} if request_id else {"equiserve.link": "request"})
            for ctx, request_id in requests
        ]
        parent = set_span_in_context(NonRecordingSpan(requests[0][0]))
        self.span = _tracer.start_span("equiserve.batch", context=parent, links=links, attributes=attributes)
        self.context = self.span.get_span_context()

    def end(self, failed: BaseException | None) -> None:
        if failed is not None:
            _record_error(self.span, failed)
        self.span.end()


def batch_span(batch: Sequence[Any], attributes: Mapping[str, Any]) -> BatchSpan | None:
    """The span of a batch of queued items (each with the ``trace`` and ``request_id`` of its request);
    None when none of them is sampled (then no one would see it)."""
    sampled: dict[int, tuple[Any, str]] = {}  # one link per request, however many of its items the batch holds
    for item in batch:
        if item.trace is not None and item.trace.trace_flags.sampled:
            sampled.setdefault(item.trace.span_id, (item.trace, item.request_id))
    return BatchSpan(list(sampled.values()), {**attributes, "equiserve.batch_size": len(batch)}) if sampled else None

"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on the engine's loop.

``EQUISERVE_GRPC_PORT`` (``serve --grpc-port``) starts a ``grpc.aio`` server in the app's
lifespan, on the same event loop and the same ``Engine`` as the HTTP routes, so both fronts share
the batches, the admission and the drain. The RPCs are the protocol's health, metadata and
``ModelInfer`` (the repository extension is not served); beside them the standard health service
(``grpc.health.v1.Health``) and server reflection.

A ``ModelInferRequest`` is read into the very ``InferBody`` a REST body becomes
(``app.oip.infer_body``): every input's bytes, from ``raw_input_contents`` or from its typed
``contents``, go to the same tensor parser as binary tensor data, and the task's ``V2Mapping``
makes its request, so both protocols take the same tensors and give the same answers. Outputs
are always ``raw_output_contents`` (what Triton sends; tritonclient reads either).

Errors are status codes: INVALID_ARGUMENT (REST 400/413/422), UNAUTHENTICATED (401), NOT_FOUND
(404), RESOURCE_EXHAUSTED (429, with ``retry-after`` and ``grpc-retry-pushback-ms`` trailers),
UNAVAILABLE (503: loading, draining), DEADLINE_EXCEEDED (504, or the client's deadline), INTERNAL
(500). A call the client cancels, or whose deadline passes, is cancelled in the engine like a
REST client that disconnects: its items are dropped before the pass. No torch here.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from app import tracing
from app.config import Settings
from app.engine.engine import Engine
from app.errors import EngineError, QueueFull
from app.oip import NUMERIC, VERSION, InferBody, TensorError, bytes_payload, infer_body, tensor_bytes

from .oip_grpc import open_inference_grpc_pb2 as pb
from .oip_grpc import open_inference_grpc_pb2_grpc as pb_grpc
from .v2 import EXTENSIONS, model_metadata_of, served_model

log = logging.getLogger("equiserve.grpc")

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
ENDPOINT = "grpc_infer"  # the endpoint label of ModelInfer in equiserve_requests_total
Code = grpc.StatusCode
# engine error code -> gRPC status; the REST status of the same error is in the metrics' label.
CODES: dict[str, grpc.StatusCode] = {
    "invalid_input": Code.INVALID_ARGUMENT,
    "undecodable_image": Code.INVALID_ARGUMENT,
    "unsupported_media_type": Code.INVALID_ARGUMENT,
    "malformed_body": Code.INVALID_ARGUMENT,
    "invalid_tensor": Code.INVALID_ARGUMENT,
    # Over a fixed limit (images, pixels): the same request never fits, so it must not read as
    # RESOURCE_EXHAUSTED, which clients retry with backoff; a message over the size limit is
    # refused by gRPC itself, with RESOURCE_EXHAUSTED.
    "too_large": Code.INVALID_ARGUMENT,
    "model_not_found": Code.NOT_FOUND,
    "queue_full": Code.RESOURCE_EXHAUSTED,
    "not_ready": Code.UNAVAILABLE,
    "deadline_exceeded": Code.DEADLINE_EXCEEDED,
    "inference_failed": Code.INTERNAL,
}
HTTP_STATUS = {
    Code.OK: 200, Code.INVALID_ARGUMENT: 400, Code.UNAUTHENTICATED: 401, Code.NOT_FOUND: 404,
    Code.RESOURCE_EXHAUSTED: 429, Code.CANCELLED: 499, Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504,
}  # fmt: skip
# Which typed field of InferTensorContents carries each datatype (FP16 and BF16 have none: raw only).
CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
CONTENT_FIELDS = sorted(set(CONTENTS.values()))
WIDE = {"bool_contents": np.bool_, "fp32_contents": np.float32, "fp64_contents": np.float64}  # else int64/uint64


class Abort(Exception):
    """A status to answer with (and trailing metadata), raised inside a handler."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.trailers = code, message, trailers


def abort_of(exc: EngineError) -> Abort:
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, QueueFull):  # REST's Retry-After; the pushback is gRPC's retry policy's own hint
        seconds = max(1, round(exc.retry_after_s))
        trailers = (("retry-after", str(seconds)), ("grpc-retry-pushback-ms", str(seconds * 1000)))
    return Abort(CODES.get(exc.code, Code.INTERNAL), exc.message, trailers)


# -- a ModelInferRequest as the REST body's header and binary data ------------------------------


def parameter_value(value: pb.InferParameter, where: str) -> Any:
    choice = value.WhichOneof("parameter_choice")
    if choice is None:
        raise TensorError(f"{where} has no value")
    return getattr(value, choice)


def parameters_of(parameters: Any, where: str) -> dict[str, Any]:
    return {key: parameter_value(value, f"parameter {key!r} of {where}") for key, value in parameters.items()}


def contents_bytes(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes:
    """An input's typed ``contents`` as the raw bytes the binary parser reads (numbers
    little-endian, BYTES elements length-prefixed); out-of-range integers are refused, not wrapped."""
    name, datatype = tensor.name, tensor.datatype
    field = CONTENTS.get(datatype)
    for other in CONTENT_FIELDS:
        if other != field and len(getattr(tensor.contents, other)):
            where = f"its contents go in {field}" if field else "send it in raw_input_contents"
            raise TensorError(f"input {name!r} is {datatype} but has {other}: {where}")
    if field is None:  # no typed field (FP16), or an unknown datatype: the parser says which
        return b""
    values = getattr(tensor.contents, field)
    if datatype == "BYTES":
        return bytes_payload(list(values))
    dtype = NUMERIC[datatype]
    wide = np.asarray(values, dtype=WIDE.get(field, np.uint64 if dtype.kind == "u" else np.int64))
    narrow = wide.astype(dtype)
    if dtype.kind in "iu" and not np.array_equal(narrow, wide):
        raise TensorError(f"input {name!r}: a value is out of range for {datatype}")
    return narrow.tobytes()


def request_body(request: pb.ModelInferRequest) -> InferBody:
    """The request read as a REST body is: its header's fields, and each input's bytes as the
    binary tensor data after it (``binary_data_size`` each, in order)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: one per input, in order")
    inputs, chunks = [], []
    for index, tensor in enumerate(request.inputs):
        parameters = parameters_of(tensor.parameters, f"input {tensor.name!r}")
        if any(key.startswith("shared_memory") for key in parameters):
            raise TensorError(f"input {tensor.name!r}: shared memory is not supported")
        if raw:
            if any(len(getattr(tensor.contents, f)) for f in CONTENT_FIELDS):
                raise TensorError(f"input {tensor.name!r} has contents, but the request sends raw_input_contents")
            chunk = raw[index]
        else:
            chunk = contents_bytes(tensor)
        chunks.append(chunk)
        shape = list(tensor.shape)
        inputs.append({"name": tensor.name, "datatype": tensor.datatype, "shape": shape,
                       "parameters": {**parameters, "binary_data_size": len(chunk)}})  # fmt: skip
    outputs = [
        {"name": o.name, "parameters": parameters_of(o.parameters, f"output {o.name!r}")} for o in request.outputs
    ]
    header = {
        "id": request.id or None,
        "parameters": parameters_of(request.parameters, "the request"),
        "inputs": inputs,
        "outputs": outputs,
    }
    return infer_body(header, b"".join(chunks))


def infer_response(model: str, body: InferBody, tensors: dict[str, tuple[str, np.ndarray]],
                   order: list[str]) -> pb.ModelInferResponse:  # fmt: skip
    """The requested outputs (all, in the model's order, when none are named) as raw contents."""
    wanted = [o.name for o in body.outputs] if body.outputs else [name for name in order if name in tensors]
    response = pb.ModelInferResponse(model_name=model, model_version=VERSION, id=body.id or "")
    for name in wanted:
        datatype, array = tensors[name]
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(tensor_bytes(datatype, array))
    return response


# -- the services ------------------------------------------------------------------------------


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, settings: Settings, version: str) -> None:
        self.engine, self.settings, self.version = engine, settings, version
        self.metrics = engine.metrics

    @property
    def accepting(self) -> bool:
        return self.engine.ready and not self.engine.draining

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.accepting)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        if not self.accepting:  # loading (its models not known yet) or draining: not ready, no error
            return pb.ModelReadyResponse(ready=False)
        await self._answer(context, lambda: served_model(self.engine, request.name, request.version or None))
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="equiserve", version=self.version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = await self._answer(
            context, lambda: model_metadata_of(self.engine, request.name, request.version or None)
        )
        response = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for spec in meta[kind]:
                getattr(response, kind).add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        started = time.perf_counter()
        name = request.model_name
        label = name if name in self.engine.models else "unknown"  # bounded series, as REST's
        call_id = request_id(context)
        span = await self._server_span(context, label, call_id) if tracing.enabled else None
        codes: list[grpc.StatusCode] = []  # the status _answer aborted with, if any
        code = Code.OK
        try:
            return await self._answer(context, lambda: self._infer(request, context, call_id), codes)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            code = Code.CANCELLED
            raise
        except BaseException:
            code = codes[0] if codes else Code.UNKNOWN
            raise
        finally:
            status = HTTP_STATUS.get(code, 500)
            self.metrics.requests.labels(label, ENDPOINT, str(status)).inc()
            self.metrics.request_duration.labels(label, ENDPOINT).observe(time.perf_counter() - started)
            if span is not None:
                span.end(status, **{"rpc.grpc.status_code": code.value[0]})

    async def _server_span(self, context: Any, model: str, call_id: str) -> tracing.ServerSpan:
        """The call's server span, continuing the client's ``traceparent`` metadata; its trace id
        goes back in the initial metadata (``x-trace-id``, REST's X-Trace-Id header)."""
        span = tracing.ServerSpan.grpc(SERVICE, "ModelInfer", context.invocation_metadata() or ())
        span.set(**{"equiserve.model": model, "equiserve.request_id": call_id})
        if span.trace_id is not None:
            await context.send_initial_metadata(((tracing.TRACE_ID_HEADER.decode(), span.trace_id),))
        return span

    async def _infer(self, request: pb.ModelInferRequest, context: Any, call_id: str) -> pb.ModelInferResponse:
        self._authorize(context)
        model, adapter = served_model(self.engine, request.model_name, request.model_version or None)
        card = model.card()
        specs = adapter.outputs(card)
        parsed: list[InferBody] = []

        async def read() -> Any:  # after admission, as REST reads its body
            body = request_body(request)
            known = {spec.name for spec in specs}
            for output in body.outputs or []:
                if output.name not in known:
                    raise TensorError(f"unknown output {output.name!r}; this model gives {sorted(known)}")
            parsed.append(body)
            return adapter.request(body, card, model.limits, known if body.outputs is None else {
                o.name for o in body.outputs})  # fmt: skip

        work = self.engine.infer(model.name, model.task, read, request_id=call_id)
        remaining = context.time_remaining()
        if remaining is None:
            output = await work
        else:
            # gRPC cancels the call when its deadline passes; waiting for that alone races with it,
            # so the engine's work is cancelled (its items dropped) at the deadline here too.
            try:
                output = await asyncio.wait_for(work, max(remaining, 0.0))
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                raise Abort(Code.DEADLINE_EXCEEDED, "the client's deadline passed before the answer") from None
        return infer_response(model.name, parsed[0], adapter.tensors(output), [spec.name for spec in specs])

    def _authorize(self, context: Any) -> None:
        """``authorization: Bearer <key>`` metadata when ``EQUISERVE_API_KEY`` is set, as REST's header."""
        key = self.settings.api_key
        if key is None:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, token = given.partition(" ") if isinstance(given, str) else ("", "", "")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
            raise Abort(Code.UNAUTHENTICATED, "missing or wrong API key: send metadata 'authorization: Bearer <key>'")

    async def _answer(self, context: Any, call: Any, codes: list[grpc.StatusCode] | None = None) -> Any:
        """``call()`` (awaited if it is a coroutine), its errors as the call's status (also put in ``codes``)."""
        try:
            result = call()
            return await result if asyncio.iscoroutine(result) else result
        except (EngineError, Abort) as exc:
            abort = abort_of(exc) if isinstance(exc, EngineError) else exc
            if abort.code == Code.INTERNAL:
                log.warning("gRPC %s: %s", abort.code.name, abort.message)
            if codes is not None:
                codes.append(abort.code)
            if abort.trailers:
                context.set_trailing_metadata(abort.trailers)
            await context.abort(abort.code, abort.message)


def request_id(context: Any) -> str:
    given = dict(context.invocation_metadata() or ()).get("x-request-id")
    return given if isinstance(given, str) and 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex


class Health(HealthServicer):
    """``grpc.health.v1.Health``: SERVING once every model is loaded and until the drain starts,
    for the server (``""``), the inference service and each served model by name; ``Check``
    reads the engine's state at the call, ``Watch`` gets it from ``follow``."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def status_of(self, service: str) -> int | None:
        known = service in ("", SERVICE) or service in self.engine.models
        if not known:
            return None
        ready = self.engine.ready and not self.engine.draining
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        status = self.status_of(request.service)
        if status is None:
            await context.abort(Code.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        status = self.status_of(request.service)
        if status is not None:  # its first answer: the state now, not as of the last poll
            await self.set(request.service, status)
        await super().Watch(request, context)

    async def follow(self, every_s: float = 0.25) -> None:
        while True:
            for service in ("", SERVICE, *list(self.engine.loaded)):  # a list the loader thread only appends to
                status = self.status_of(service)
                if status is not None:
                    await self.set(service, status)
            await asyncio.sleep(every_s)


class GrpcServer:
    """The running gRPC server of an app (``start`` in its lifespan, ``stop`` before the engine's)."""

    def __init__(self, server: grpc.aio.Server, health: Health, port: int) -> None:
        self.server, self.health, self.port = server, health, port
        self._follow = asyncio.get_running_loop().create_task(health.follow(), name="grpc-health")

    async def stop(self, grace_s: float) -> None:
        """Calls in flight are answered (for up to ``grace_s``); new ones get UNAVAILABLE."""
        self._follow.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        log.info("gRPC: stopped")


async def start_grpc_server(engine: Engine, settings: Settings, version: str) -> GrpcServer:
    """Listen on ``host:grpc_port`` on the running loop. Messages are limited like REST bodies
    (``EQUISERVE_MAX_BODY_BYTES``); the port is shared between processes only with
    ``reuse_port`` (``--processes``): gRPC's own default, SO_REUSEPORT, would let a second server
    bind a taken port without an error."""
    options = [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(engine, settings, version), server)
    health = Health(engine)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Reflection reads the messages' own pool (app/api/oip_grpc/generate.py): the health and
    # reflection services are added to it so that it describes every service served.
    for descriptor in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pb.POOL.AddSerializedFile(descriptor.serialized_pb)
    names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=pb.POOL)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    try:
        port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    except RuntimeError as exc:  # grpcio raises where it cannot bind
        raise RuntimeError(f"gRPC cannot listen on {host}:{settings.grpc_port}: {exc}") from exc
    await server.start()
    log.info("gRPC: Open Inference Protocol on %s:%d", host, port)
    return GrpcServer(server, health, port)

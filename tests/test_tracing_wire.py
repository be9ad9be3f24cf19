"""Tracing over the wire: a real ``python -m app serve`` exports its spans with OTLP/HTTP (the
standard env vars only) to a receiver on 127.0.0.1 in this test, which decodes each protobuf
body (opentelemetry-proto's ExportTraceServiceRequest); the spans of a batch of concurrent
requests arrive with their tree and links. In process: tests/test_tracing.py; through a Ray Serve
replica: tests/test_ray_serve.py (its one cluster scenario uses this receiver)."""

from __future__ import annotations

import gzip
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.apptools import free_port, start_server, wait_ready
from tests.imagetools import png_bytes, write_tiny_model

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP traces endpoint: every span it is sent, with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        self.resources: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.instance_of: dict[bytes, str] = {}  # span id -> the service.instance.id that sent it
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            self.server.paths.append(self.path)
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource)
                self.server.resources.append(resource)
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                )
                for scope_spans in resource_spans.scope_spans:
                    self.server.spans.extend((service, span) for span in scope_spans.spans)
                    for span in scope_spans.spans:
                        self.server.instance_of[span.span_id] = str(resource.get("service.instance.id"))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def attributes(span: Any) -> dict[str, Any]:
    out = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out


@pytest.mark.slow
def test_a_real_server_exports_the_span_tree_over_otlp_http(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "equiserve-wire-test")
    monkeypatch.delenv("EQUISERVE_TRACING", raising=False)
    write_tiny_model(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Batches wait for requests being read: over real sockets from four threads the four may still
    # come as one batch or several (a batch leaves when none is on its way); the links say which.
    with start_server(tmp_path, port, "--max-batch-size", "4", "--max-wait-ms", "5000", "--no-warmup") as process:
        wait_ready(base, process)
        images = [png_bytes(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(4)]

        def post(i: int) -> httpx.Response:
            headers = {"x-request-id": f"wire{i}"}
            if i == 0:
                headers["traceparent"] = f"00-{TRACE_ID}-{PARENT_ID}-01"
            files = [("image", ("a.png", images[i], "image/png"))]
            data = {"method": "equizero"}
            return httpx.post(f"{base}/v1/models/tiny/classify", files=files, data=data, headers=headers, timeout=60)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, range(4)))
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        assert answers[0].headers["x-trace-id"] == TRACE_ID
        trace_ids = {r.headers["x-trace-id"] for r in answers}
        assert len(trace_ids) == 4

        def arrived() -> list[Any]:
            with receiver.lock:
                return [span for _, span in receiver.spans]

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(s.name == "equiserve.combine" for s in arrived()) < 4:
            time.sleep(0.1)
        output = process.output()
    spans = arrived()
    assert receiver.paths and set(receiver.paths) == {"/v1/traces"}
    assert {service for service, _ in receiver.spans} == {"equiserve-wire-test"}
    for trace_id in trace_ids:  # the access line names the trace
        assert f"trace_id={trace_id}" in output

    servers = [s for s in spans if s.name == "POST /v1/models/{name}/classify"]
    assert sorted(s.trace_id.hex() for s in servers) == sorted(trace_ids)
    first = next(s for s in servers if s.trace_id.hex() == TRACE_ID)
    assert first.parent_span_id.hex() == PARENT_ID  # the client's traceparent continued
    requests = {}
    for server in servers:
        assert attributes(server)["http.response.status_code"] == 200
        under = {s.name: s for s in spans if s.parent_span_id == server.span_id}
        assert set(under) == {"equiserve.request", "equiserve.answer"}
        request = under["equiserve.request"]
        requests[request.span_id] = request
        steps = {s.name for s in spans if s.parent_span_id == request.span_id}
        assert {"equiserve.admission", "equiserve.read", "equiserve.prepare", "equiserve.queue"} <= steps
        assert "equiserve.combine" in steps
        attrs = attributes(request)
        assert attrs["equiserve.method"] == "equizero" and attrs["equiserve.group_order"] == 4
        assert attrs["equiserve.selected_transform"] in {"identity", "rot90", "rot180", "rot270"}
    batches = {s.span_id: s for s in spans if s.name == "equiserve.batch"}
    assert sum(attributes(b)["equiserve.batch_size"] for b in batches.values()) == 4  # one image per request
    served = [link.span_id for b in batches.values() for link in b.links]
    assert sorted(served) == sorted(requests)  # every request linked from exactly one batch
    for batch in batches.values():
        assert len(batch.links) == attributes(batch)["equiserve.batch_size"]
        assert batch.parent_span_id in {link.span_id for link in batch.links}  # in one of its requests' traces
    for request in requests.values():
        queue = next(s for s in spans if s.parent_span_id == request.span_id and s.name == "equiserve.queue")
        [link] = queue.links
        batch = batches[link.span_id]
        assert request.span_id in {back.span_id for back in batch.links}  # linked both ways
        assert attributes(request)["equiserve.batch_size"] == attributes(batch)["equiserve.batch_size"]


@pytest.mark.slow
def test_a_grpc_call_continues_the_clients_trace(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ModelInfer over gRPC: the client's ``traceparent`` metadata is continued by a server span
    named after the RPC, the engine's spans under it; the trace id comes back in the initial
    metadata (``x-trace-id``), and a refused call's span carries its gRPC status."""
    import grpc

    from app.api.oip_grpc import open_inference_grpc_pb2 as pb
    from app.api.oip_grpc import open_inference_grpc_pb2_grpc as pb_grpc

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.delenv("EQUISERVE_TRACING", raising=False)
    write_tiny_model(tmp_path)
    port, grpc_port = free_port(), free_port()
    photo = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    request = pb.ModelInferRequest(
        model_name="tiny",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
        raw_input_contents=[len(photo).to_bytes(4, "little") + photo],  # BYTES: length-prefixed elements
    )
    traceparent = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
    with start_server(tmp_path, port, "--grpc-port", str(grpc_port), "--no-warmup") as process:
        wait_ready(f"http://127.0.0.1:{port}", process)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            response, call = stub.ModelInfer.with_call(request, metadata=traceparent, timeout=60)
            assert response.model_name == "tiny"
            assert dict(call.initial_metadata())["x-trace-id"] == TRACE_ID
            unknown = pb.ModelInferRequest(model_name="nope", inputs=request.inputs)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(unknown, timeout=60)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        deadline = time.monotonic() + 30
        name = "inference.GRPCInferenceService/ModelInfer"
        while time.monotonic() < deadline:
            with receiver.lock:
                spans = [span for _, span in receiver.spans]
            if sum(s.name == name for s in spans) == 2 and any(s.name == "equiserve.combine" for s in spans):
                break
            time.sleep(0.1)
    servers = {attributes(s)["equiserve.model"]: s for s in spans if s.name == name}
    served, lost = servers["tiny"], servers["unknown"]
    assert served.trace_id.hex() == TRACE_ID and served.parent_span_id.hex() == PARENT_ID
    attrs = attributes(served)
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.grpc.status_code"] == 0
    under = {s.name for s in spans if s.parent_span_id == served.span_id}
    assert "equiserve.request" in under
    assert attributes(lost)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert lost.trace_id.hex() != TRACE_ID  # a call without a traceparent starts its own trace


def start_receiver() -> Receiver:
    """A receiver serving in a thread of its own, and this process's environment pointing the
    servers it starts at it (tests/test_ray_serve.py's scenario, whose replicas then export)."""
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ.update(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=server.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    return server


def trace_through(base: str, server: Receiver, model: str = "tiny") -> dict[str, Any]:
    """One request carrying a client's traceparent to the server at ``base``, which exports to
    ``server``: what arrived of that trace, and who sent it."""
    files = [("image", ("a.png", png_bytes(np.zeros((32, 32, 3), np.uint8)), "image/png"))]
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    r = httpx.post(f"{base}/v1/models/{model}/classify", files=files, headers=headers, timeout=60)
    found: list[Any] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with server.lock:
            found = [s for _, s in server.spans if s.trace_id.hex() == TRACE_ID]
        if any(s.name == "equiserve.combine" for s in found):
            break
        time.sleep(0.2)
    with server.lock:
        instances = sorted({server.instance_of.get(s.span_id, "") for s in found})
    root = next((s for s in found if s.name.startswith("POST ")), None)
    return {
        "status": r.status_code,
        "x_trace_id": r.headers.get("x-trace-id"),
        "replica": r.headers.get("x-replica"),
        "names": sorted({s.name for s in found}),
        "server_parent": root.parent_span_id.hex() if root is not None else None,
        "instances": instances,
    }


def assert_the_clients_trace_continues(report: dict[str, Any]) -> None:
    """``trace_through``'s report on a Ray Serve replica: the client's traceparent reached it
    through Ray's proxy, and the replica that answered exported that trace's spans, naming itself."""
    assert report["status"] == 200 and report["x_trace_id"] == TRACE_ID, report
    assert report["server_parent"] == PARENT_ID, report  # the client's span, through Ray's proxy
    assert {"equiserve.request", "equiserve.batch", "equiserve.queue"} <= set(report["names"]), report
    assert report["replica"] in report["instances"], report  # service.instance.id: the replica

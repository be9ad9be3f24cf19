"""OpenTelemetry tracing (app/tracing.py), in process: the span tree of a batch of concurrent
requests, its links and attributes, W3C traceparent in and the trace id out (X-Trace-Id, the
access log), the engine traced without HTTP, and what is configured when. Off, nothing of
OpenTelemetry is imported (a fresh interpreter serves a request and looks).

The real server exporting over OTLP/HTTP to a receiver: tests/test_tracing_wire.py."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app import tracing
from app.config import Settings
from app.engine.engine import Engine
from tests.apptools import ROOT, make_settings, serving
from tests.imagetools import png_bytes

URL = "/v1/models/tiny/classify"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
REQUEST_STEPS = {"equiserve.admission", "equiserve.read", "equiserve.prepare", "equiserve.queue", "equiserve.combine"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup(exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.enabled


def image(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8))


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def children(all_spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in all_spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_a_batch_of_concurrent_requests_is_one_batch_span_linked_to_each(
    tiny_models_dir: Path, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """Four requests in one batch (it leaves when full): four traces, each server span -> the
    engine's request span -> its steps, plus the answer; ONE batch span, child of one request and
    linked to all four, each request's queue span linking back to it. The first request carries a
    traceparent: its trace continues the client's, and the trace id comes back."""
    settings = make_settings(tiny_models_dir, max_batch_size=4, max_wait_ms=5000)
    methods = ["equizero", "lambda", "equitune", "vanilla"]
    async with serving(settings) as (client, _):

        async def post(i: int) -> object:
            headers = {"x-request-id": f"r{i}"}
            if i == 0:
                headers["traceparent"] = f"00-{TRACE_ID}-{PARENT_ID}-01"
            files = [("image", ("a.png", image(i), "image/png"))]
            return await client.post(URL, files=files, data={"method": methods[i]}, headers=headers)

        with caplog.at_level(logging.INFO, logger="equiserve.access"):
            answers = await asyncio.gather(*(post(i) for i in range(4)))
    assert [r.status_code for r in answers] == [200] * 4
    assert all(r.json()["timing"]["batch_size"] == 4 for r in answers)
    finished = list(spans.get_finished_spans())

    servers = {s.attributes["equiserve.request_id"]: s for s in finished if s.name == "POST /v1/models/{name}/classify"}
    assert sorted(servers) == ["r0", "r1", "r2", "r3"]
    # traceparent in -> the same trace out, in the header and in the access line
    assert hex_id(servers["r0"].context.trace_id, 32) == TRACE_ID
    assert servers["r0"].parent is not None and hex_id(servers["r0"].parent.span_id, 16) == PARENT_ID
    assert servers["r0"].parent.is_remote
    assert answers[0].headers["x-trace-id"] == TRACE_ID
    trace_ids = {hex_id(s.context.trace_id, 32) for s in servers.values()}
    assert len(trace_ids) == 4  # one trace per request
    assert {r.headers["x-trace-id"] for r in answers} == trace_ids
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "equiserve.access"]
    for r in answers:
        assert any(line.endswith(f"trace_id={r.headers['x-trace-id']}") for line in lines), lines

    batches = [s for s in finished if s.name == "equiserve.batch"]
    assert len(batches) == 1
    batch = batches[0]
    assert batch.attributes["equiserve.batch_size"] == 4 and batch.attributes["equiserve.group_order"] == 4
    assert batch.attributes["equiserve.model"] == "tiny" and batch.attributes["equiserve.group"] == "c4"

    requests = {}
    for request_id, server in servers.items():
        assert server.kind.name == "SERVER" and server.attributes["http.response.status_code"] == 200
        assert server.attributes["http.route"] == "/v1/models/{name}/classify"
        assert server.attributes["equiserve.model"] == "tiny"
        under_server = children(finished, server)
        assert sorted(s.name for s in under_server) == ["equiserve.answer", "equiserve.request"]
        request = next(s for s in under_server if s.name == "equiserve.request")
        requests[request_id] = request
        steps = children(finished, request)
        assert {s.name for s in steps} >= REQUEST_STEPS
        assert {s.name for s in steps} - REQUEST_STEPS <= {"equiserve.batch"}
        assert all(s.context.trace_id == server.context.trace_id for s in steps)
        attributes = request.attributes
        assert attributes["equiserve.model"] == "tiny" and attributes["equiserve.task"] == "classify"
        assert attributes["equiserve.group_order"] == 4 and attributes["equiserve.batch_size"] == 4
        assert attributes["equiserve.method"] == methods[int(request_id[1])]
        # the steps in order of the flow, the queue span linking to the batch span
        by_name = {s.name: s for s in steps}
        order = ["equiserve.admission", "equiserve.read", "equiserve.prepare", "equiserve.queue", "equiserve.combine"]
        starts = [by_name[name].start_time for name in order]
        assert starts == sorted(starts)
        queue = by_name["equiserve.queue"]
        assert [link.context.span_id for link in queue.links] == [batch.context.span_id]
        assert queue.end_time <= batch.start_time + 50_000_000  # the wait ends when the batch starts (clocks: ns)
    # equizero's chosen copy where it exists
    assert (
        requests["r0"].attributes["equiserve.selected_transform"]
        == answers[0].json()["results"][0]["selected_transform"]
    )
    assert "equiserve.selected_transform" not in requests["r2"].attributes  # equitune chooses none

    # the batch span: in one request's trace, linked to every request's span
    assert batch.parent is not None and batch.parent.span_id in {s.context.span_id for s in requests.values()}
    linked = {(link.context.span_id, link.attributes["equiserve.request_id"]) for link in batch.links}
    assert linked == {(s.context.span_id, rid) for rid, s in requests.items()}


async def test_an_unsampled_traceparent_is_not_traced_and_gets_no_trace_id(
    tiny_models_dir: Path, spans: InMemorySpanExporter
) -> None:
    """The default sampler follows the caller's decision: flags 00 -> no span, no X-Trace-Id."""
    async with serving(make_settings(tiny_models_dir)) as (client, _):
        files = [("image", ("a.png", image(0), "image/png"))]
        r = await client.post(URL, files=files, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
        assert r.status_code == 200 and "x-trace-id" not in r.headers
        assert spans.get_finished_spans() == ()
        r = await client.get("/health/ready")  # probes are never traced
        assert "x-trace-id" not in r.headers
        assert spans.get_finished_spans() == ()


async def test_a_refused_request_is_an_error_of_its_admission(
    tiny_models_dir: Path, spans: InMemorySpanExporter
) -> None:
    async with serving(make_settings(tiny_models_dir)) as (client, _):
        r = await client.post("/v1/models/nope/classify", files=[("image", ("a.png", image(0), "image/png"))])
    assert r.status_code == 404
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert finished["equiserve.admission"].status.status_code.name == "ERROR"
    assert "model_not_found" in finished["equiserve.request"].status.description
    server = finished["POST /v1/models/{name}/classify"]
    assert server.attributes["http.response.status_code"] == 404
    assert server.attributes["equiserve.model"] == "unknown"  # bounded, as the metrics' label
    assert r.headers["x-trace-id"] == hex_id(server.context.trace_id, 32)


async def test_the_engine_without_http_traces_its_requests_as_roots(
    tiny_models_dir: Path, spans: InMemorySpanExporter
) -> None:
    from PIL import Image

    from app.tasks.classify.messages import ClassifyRequest

    engine = Engine(make_settings(tiny_models_dir, warmup=False))
    await engine.start()
    try:
        pixels = np.asarray(Image.open(__import__("io").BytesIO(image(3))).convert("RGB"))
        await engine.infer("tiny", "classify", ClassifyRequest([pixels], method="equizero"), request_id="x")
    finally:
        await engine.stop()
    finished = list(spans.get_finished_spans())
    request = next(s for s in finished if s.name == "equiserve.request")
    assert request.parent is None and request.attributes["equiserve.method"] == "equizero"
    assert request.attributes["equiserve.selected_transform"] in {"identity", "rot90", "rot180", "rot270"}
    names = {s.name for s in children(finished, request)}
    assert names == (REQUEST_STEPS - {"equiserve.read"}) | {"equiserve.batch"}  # a request object: nothing to read


def test_what_turns_tracing_on() -> None:
    assert not tracing.wanted("auto", {})
    assert tracing.wanted("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted("auto", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    assert tracing.wanted("auto", {"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted("auto", {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert not tracing.wanted("auto", {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert tracing.wanted("on", {}) and not tracing.wanted("off", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert Settings().tracing == "auto"


def test_without_the_extra_start_says_which_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "MODULES", ("opentelemetry.not_installed_here",))
    with pytest.raises(SystemExit, match=r"needs the 'tracing' extra .*pip install -e '\.\[tracing\]'"):
        tracing.start("on")
    assert not tracing.enabled
    assert tracing.start("off") is False  # not configured: nothing is checked


def test_an_unsupported_exporter_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(SystemExit, match="http/protobuf only"):
        tracing.start("on")
    assert not tracing.enabled


OFF_SCRIPT = """
import asyncio, json, sys
import numpy as np
from pathlib import Path
from tests.apptools import make_settings, serving
from tests.imagetools import png_bytes, write_tiny_model
from app import tracing

async def main():
    write_tiny_model(Path(sys.argv[1]))
    async with serving(make_settings(Path(sys.argv[1]), tracing=sys.argv[2])) as (client, _):
        files = [("image", ("a.png", png_bytes(np.zeros((32, 32, 3), np.uint8)), "image/png"))]
        r = await client.post("/v1/models/tiny/classify", files=files, headers={"traceparent": "%s"})
        assert r.status_code == 200, r.text
    # FastAPI itself imports the OpenTelemetry API when it is installed (its native telemetry, off
    # without a global tracer provider, which app.tracing never sets): the SDK is what tracing costs.
    sdk = ("opentelemetry.sdk", "opentelemetry.exporter")
    report = {"otel": sorted(m for m in sys.modules if m.startswith(sdk)),
              "enabled": tracing.enabled, "trace_id": r.headers.get("x-trace-id")}
    tracing.shutdown()  # the console exporter's spans are printed before the report
    print(json.dumps(report))

asyncio.run(main())
"""


@pytest.mark.parametrize("configured", [False, True])
def test_off_nothing_of_opentelemetry_is_imported(tmp_path: Path, configured: bool) -> None:
    """A fresh interpreter serves a request with tracing off: neither the SDK nor an exporter is
    loaded; the same script with tracing configured loads the SDK (so the check can fail)."""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("OTEL_", "EQUISERVE_"))}
    if configured:
        env["OTEL_TRACES_EXPORTER"] = "console"
        setup = "from app import tracing; tracing.start('auto')\n"
    else:
        setup = ""
    script = setup + OFF_SCRIPT % f"00-{TRACE_ID}-{PARENT_ID}-01"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), "auto"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if configured:
        assert "opentelemetry.sdk.trace" in report["otel"] and report["trace_id"] == TRACE_ID
    else:
        assert report == {"otel": [], "enabled": False, "trace_id": None}


async def test_a_streamed_generation_is_one_trace_that_lasts_the_stream(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """engine.stream: the request span ends once the last event is out, with the same steps."""
    from tests.generatetools import write_tiny_lm

    write_tiny_lm(tmp_path, lambda_net=True)
    async with serving(make_settings(tmp_path)) as (client, app):
        name = next(iter(app.state.engine.models))
        body = {"prompt": "The woman worked as", "max_new_tokens": 3, "seed": 1, "method": "equizero", "stream": True}
        r = await client.post(f"/v1/models/{name}/generate", json=body)
        assert r.status_code == 200 and "event: done" in r.text
    finished = list(spans.get_finished_spans())
    request = next(s for s in finished if s.name == "equiserve.request")
    server = next(s for s in finished if s.kind.name == "SERVER")
    assert request.parent is not None and request.parent.span_id == server.context.span_id
    assert r.headers["x-trace-id"] == hex_id(server.context.trace_id, 32)
    assert {s.name for s in children(finished, request)} >= REQUEST_STEPS - {"equiserve.read"}  # parsed first
    assert request.attributes["equiserve.task"] == "generate" and request.attributes["equiserve.method"] == "equizero"
    assert request.status.status_code.name == "UNSET"

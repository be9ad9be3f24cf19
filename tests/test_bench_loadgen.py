"""The load generator of bench/ against a tiny in-thread server: bounded, counted, ids echoed.

Kept fast (a few seconds) so the benchmarks' shared machinery does not rot between the
(long) benchmark runs.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402


def dummy_app() -> FastAPI:
    """Answers classify after 20 ms with equiserve's timing object; model 'busy' sheds with 429."""
    app = FastAPI()

    @app.post("/v1/models/{name}/classify")
    async def classify(name: str, request: Request) -> JSONResponse:
        await request.body()
        headers = {"x-request-id": request.headers.get("x-request-id", "")}
        if name == "busy":
            return JSONResponse({"error": {"code": "queue_full"}}, status_code=429, headers=headers)
        await asyncio.sleep(0.02)
        body = {"results": [], "timing": {"queue_ms": 1.5, "inference_ms": 2.5, "batch_size": 3}}
        return JSONResponse(body, headers=headers)

    return app


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    port = loadgen.free_port()
    server = uvicorn.Server(uvicorn.Config(dummy_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


@pytest.fixture(scope="module")
def photos() -> list[loadgen.Photo]:
    return loadgen.load_photos(["chelsea"], include_darknet=False)


def test_closed_loop_counts_every_request(server_url: str, photos: list[loadgen.Photo]) -> None:
    templates = loadgen.photo_templates(photos, "tiny")
    result = asyncio.run(
        loadgen.run_closed_loop(server_url, templates, concurrency=4, duration_s=1.0, warmup_s=0.2, id_prefix="t")
    )
    summary = result.summary()
    assert summary["sent"] > 10 and summary["ok"] == summary["sent"]
    assert summary["status_counts"] == {"200": summary["sent"]}
    assert summary["mean_batch_size"] == 3 and summary["server_queue_ms_p50"] == 1.5
    assert summary["latency"]["p50_ms"] >= 20
    assert all(r.echoed_id == r.request_id for r in result.records)
    assert len({r.request_id for r in result.records}) == len(result.records)
    assert result.wall_s < 5  # stops by itself


def test_closed_loop_stops_at_max_requests(server_url: str, photos: list[loadgen.Photo]) -> None:
    templates = loadgen.photo_templates(photos, "tiny")
    result = asyncio.run(loadgen.run_closed_loop(server_url, templates, concurrency=3, duration_s=30, max_requests=7))
    assert len(result.records) == 7 and result.wall_s < 5


def test_open_loop_bounds_inflight_and_counts_statuses(server_url: str, photos: list[loadgen.Photo]) -> None:
    templates = [
        *loadgen.photo_templates(photos, "tiny"),
        loadgen.RequestTemplate("busy", "POST", "/v1/models/busy/classify", b"{}", "application/json", (429,)),
    ]
    result = asyncio.run(
        loadgen.run_open_loop(server_url, templates, rate=400, duration_s=0.5, max_inflight=2, id_prefix="o")
    )
    summary = result.summary()
    assert result.client_dropped > 0  # 400/s against 2 in flight of ~20 ms each
    assert summary["sent"] + result.client_dropped == 200
    assert summary["unexpected"] == 0 and summary["transport_errors"] == 0
    assert set(summary["status_counts"]) <= {"200", "429"}


def test_multipart_body_parses(photos: list[loadgen.Photo]) -> None:
    template = loadgen.multipart_classify(photos, "tiny", method="lambda", top_k=2)
    assert template.content_type is not None and template.content_type.startswith("multipart/form-data; boundary=")
    boundary = template.content_type.split("boundary=")[1].encode()
    assert template.body.count(b"--" + boundary) == 4  # method, top_k, one image, closing
    assert photos[0].data in template.body


def test_only_loopback_targets() -> None:
    loadgen.check_loopback("http://127.0.0.1:8000")
    loadgen.check_loopback("http://localhost:1")
    loadgen.check_loopback("http://[::1]:8000")
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://192.168.1.2"):
        with pytest.raises(ValueError, match="loopback"):
            loadgen.check_loopback(url)

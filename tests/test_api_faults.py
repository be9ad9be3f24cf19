"""A backbone that raises in one batch: only that batch fails (500, request id logged)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

from tests.apptools import make_settings, serving
from tests.imagetools import png_bytes

URL = "/v1/models/tiny/classify"


async def test_a_failing_batch_fails_alone_and_the_server_goes_on(
    tiny_models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    files = [("image", ("a.png", image, "image/png"))]
    async with serving(make_settings(tiny_models_dir, max_wait_ms=100)) as (client, app):
        model = app.state.engine.models["tiny"].model
        real = model.encode_copies
        calls = {"n": 0}

        def flaky(x):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real(x)

        model.encode_copies = flaky
        with caplog.at_level(logging.INFO):
            ids = [f"req-{i}" for i in range(3)]
            first = await asyncio.gather(*(client.post(URL, files=files, headers={"X-Request-ID": i}) for i in ids))
        assert [r.status_code for r in first] == [500, 500, 500]
        for r, request_id in zip(first, ids, strict=True):
            error = r.json()["error"]
            assert error["code"] == "inference_failed" and error["request_id"] == request_id
            assert r.headers["x-request-id"] == request_id
            assert "illegal memory" not in error["message"]  # internals stay in the log
        logged = "\n".join(record.getMessage() for record in caplog.records)
        assert all(request_id in logged for request_id in ids)
        assert "CUDA error" in caplog.text
        # the next batch is served, and the server is still ready
        assert (await client.post(URL, files=files)).status_code == 200
        assert (await client.get("/health/ready")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'equiserve_requests_total{endpoint="classify",model="tiny",status="500"} 3.0' in metrics

"""A client that disconnects while its request is queued: its image never reaches the model."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from app.server import create_app
from tests.apptools import make_settings
from tests.imagetools import png_bytes


def classify_scope(headers: list[tuple[bytes, bytes]]) -> dict:
    """The ASGI scope of ``POST /v1/models/tiny/classify``: driving the app by hand lets a test
    choose exactly when the client's body arrives and when it hangs up."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/models/tiny/classify", "raw_path": b"/v1/models/tiny/classify", "query_string": b"",
        "headers": headers, "client": ("127.0.0.1", 1234), "server": ("test", 80), "root_path": "",
    }  # fmt: skip


async def test_disconnected_request_is_dropped_before_the_forward_pass(tiny_models_dir: Path) -> None:
    app = create_app(make_settings(tiny_models_dir, max_wait_ms=300, max_batch_size=8))
    image = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    body = json.dumps({"images": [{"b64": base64.b64encode(image).decode()}]}).encode()
    async with LifespanManager(app) as manager:
        engine = app.state.engine
        batcher = engine.batchers["tiny"]
        batches_before = batcher.stats.batches
        sent: list[dict] = []
        body_sent = asyncio.Event()
        hang_up = asyncio.Event()

        async def receive() -> dict:
            if not body_sent.is_set():
                body_sent.set()
                return {"type": "http.request", "body": body, "more_body": False}
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = classify_scope([(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())])
        arrival = engine.batchers["tiny"].announce()  # another request on its way: the batch timer runs
        call = asyncio.ensure_future(manager.app(scope, receive, send))
        for _ in range(100):  # wait until the image is queued
            await asyncio.sleep(0.005)
            if batcher.depth == 1:
                break
        assert batcher.depth == 1
        hang_up.set()  # the client goes away while its image waits for the batch timer
        await asyncio.wait_for(call, 5)
        await asyncio.sleep(0.5)  # past the 300 ms batch timer
        assert batcher.stats.cancelled == 1
        assert batcher.stats.batches == batches_before  # no forward pass ran for it
        assert engine.idle
        statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
        assert statuses in ([], [499])  # nobody is listening; nothing else is sent
        arrival.close()


async def test_a_client_gone_mid_body_is_a_499_not_a_server_error(
    tiny_models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The keep-alive race under overload: the client hangs up while its multipart body is
    still arriving. That is recorded as 499, without a traceback, and the server stays idle."""
    app = create_app(make_settings(tiny_models_dir))
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()  # fmt: skip
    async with LifespanManager(app) as manager:
        messages = [{"type": "http.request", "body": head, "more_body": True}, {"type": "http.disconnect"}]
        sent: list[dict] = []

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = classify_scope([(b"content-type", f"multipart/form-data; boundary={boundary}".encode())])
        with caplog.at_level(logging.INFO):
            await asyncio.wait_for(manager.app(scope, receive, send), 5)
        statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
        assert statuses == [499]
        assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]
        metrics = app.state.engine.metrics.exposition().decode()
        assert 'status="499"' in metrics and 'status="500"' not in metrics
        assert app.state.engine.idle and app.state.engine.batchers["tiny"]._arriving == 0

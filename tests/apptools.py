"""Start the real app (with its lifespan) behind an httpx AsyncClient."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.config import Settings
from app.server import create_app


def make_settings(models_dir: Path, **overrides: Any) -> Settings:
    defaults: dict[str, Any] = {"models_dir": models_dir, "max_batch_size": 8, "max_wait_ms": 5, "device": "cpu"}
    return Settings(**{**defaults, **overrides})


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client, app

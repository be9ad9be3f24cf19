"""Freed memory goes back to the OS once the engine is idle: the trim itself (a real RSS drop
in a fresh process) and the engine's once-per-quiet-spell schedule."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.engine import engine as engine_module
from app.runtime.memory import trim_supported
from tests.apptools import make_settings, serving
from tests.imagetools import png_bytes

pytestmark = pytest.mark.skipif(not trim_supported(), reason="malloc_trim is glibc's; nothing to test elsewhere")

FRAGMENTED_HEAP = textwrap.dedent(
    """
    import os
    from app.runtime.memory import release_free_memory

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    # 64 KiB blocks stay below glibc's mmap threshold: they live in the heap, like the
    # buffers of a burst of requests; keeping every 50th pins the heap so it cannot shrink
    # from the top alone.
    blocks = [bytearray(os.urandom(64)) * 1024 for _ in range(6000)]
    kept = blocks[::50]
    del blocks
    before = rss_kib()
    released = release_free_memory()
    after = rss_kib()
    print(before, after, released)
    """
)


def test_trim_returns_freed_heap_pages() -> None:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_HEAP], cwd=root, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    before, after, released = int(out[0]), int(out[1]), out[2] == "True"
    assert released
    assert before - after > 200_000, (before, after)  # ~370 MiB were freed; most of it goes back


@pytest.fixture
def releases(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per time the engine released memory (the release itself is replaced)."""
    calls: list[int] = []
    monkeypatch.setattr(engine_module, "release_free_memory", lambda: calls.append(1) or True)
    return calls


async def classify_once(client: httpx.AsyncClient) -> None:
    image = png_bytes(np.zeros((40, 40, 3), "uint8"))
    r = await client.post("/v1/models/tiny/classify", files=[("image", ("a.png", image, "image/png"))])
    assert r.status_code == 200


async def test_engine_trims_once_per_quiet_spell(tiny_models_dir: Path, releases: list[int]) -> None:
    settings = make_settings(tiny_models_dir, memory_trim_idle_s=0.1, warmup=False)
    async with serving(settings) as (client, _):
        await asyncio.sleep(0.4)
        assert releases == []  # no traffic yet: nothing to give back
        await classify_once(client)
        await asyncio.sleep(0.5)
        assert len(releases) == 1  # trimmed after the quiet spell, and only once
        await classify_once(client)
        await asyncio.sleep(0.5)
        assert len(releases) == 2


async def test_steady_traffic_is_not_trimmed_between_requests(tiny_models_dir: Path, releases: list[int]) -> None:
    """A client at concurrency 1 leaves the engine idle for moments between its requests;
    those are not quiet spells: releasing then would make every next batch regrow memory."""
    settings = make_settings(tiny_models_dir, memory_trim_idle_s=0.3, warmup=False)
    async with serving(settings) as (client, _):
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5
        while loop.time() < end:
            await classify_once(client)
            await asyncio.sleep(0.1)  # idle most of the time, but never for a whole interval
        assert releases == []
        await asyncio.sleep(1.0)
        assert len(releases) == 1


async def test_zero_disables_trimming(tiny_models_dir: Path, releases: list[int]) -> None:
    async with serving(make_settings(tiny_models_dir, memory_trim_idle_s=0, warmup=False)) as (client, _):
        await classify_once(client)
        await asyncio.sleep(0.3)
    assert releases == []

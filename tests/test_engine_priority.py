"""Compute threads run at a lower priority than the event loop (Linux per-thread nice)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from app.engine.priority import lower_this_thread
from tests.apptools import make_settings, serving
from tests.imagetools import png_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_only_the_calling_thread_is_lowered() -> None:
    before = nice_of_this_thread()
    seen: list[int] = []

    def worker() -> None:
        lower_this_thread(5)
        seen.append(nice_of_this_thread())
        inner = threading.Thread(target=lambda: seen.append(nice_of_this_thread()))  # inherited
        inner.start()
        inner.join()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [min(19, before + 5)] * 2
    assert nice_of_this_thread() == before  # the caller (the event loop's thread) is untouched
    lower_this_thread(0)
    assert nice_of_this_thread() == before


async def test_inference_and_preprocessing_run_below_the_event_loop(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.tasks.classify.model import ClassifyModel

    seen: dict[str, int] = {}
    real_call, real_pre = ClassifyModel.__call__, ClassifyModel.preprocess

    def call(self: ClassifyModel, items: list) -> list:
        seen["inference"] = nice_of_this_thread()
        return real_call(self, items)

    def preprocess(self: ClassifyModel, image: np.ndarray) -> object:
        seen["preprocess"] = nice_of_this_thread()
        return real_pre(self, image)

    monkeypatch.setattr(ClassifyModel, "__call__", call)
    monkeypatch.setattr(ClassifyModel, "preprocess", preprocess)
    loop_nice = nice_of_this_thread()
    image = png_bytes(np.zeros((40, 40, 3), np.uint8))
    async with serving(make_settings(tiny_models_dir, compute_nice=7, warmup=False)) as (client, _):
        r = await client.post("/v1/models/tiny/classify", files=[("image", ("a.png", image, "image/png"))])
        assert r.status_code == 200
        assert nice_of_this_thread() == loop_nice
    assert seen == {"inference": min(19, loop_nice + 7), "preprocess": min(19, loop_nice + 7)}

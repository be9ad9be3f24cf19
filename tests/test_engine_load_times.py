"""A start says how long it still has to go, from the last start's load times."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from app.engine.engine import Engine
from app.engine.load_times import LoadTimes
from tests.apptools import make_settings
from tests.imagetools import write_tiny_model


def test_the_remaining_time_is_what_the_pending_models_took_last_time(tmp_path: Path) -> None:
    times = LoadTimes(tmp_path / "load-times.json")
    assert times.remaining_s(["a", "b"]) is None  # a first start: nothing to go by
    times.done("a", 4.0)
    times.done("b", 6.0)
    later = LoadTimes(tmp_path / "load-times.json")
    assert later.previous == {"a": 4.0, "b": 6.0}
    assert later.remaining_s(["a", "b"]) == pytest.approx(10.0)
    later.start("a")
    time.sleep(0.2)
    assert 9.0 < later.remaining_s(["a", "b"]) < 9.85  # what "a" has run so far counts
    assert later.remaining_s(["a", "b", "new"]) is None
    (tmp_path / "load-times.json").write_text("[broken")
    assert LoadTimes(tmp_path / "load-times.json").previous == {}


async def test_a_start_records_its_models_times_for_the_next(tmp_path: Path) -> None:
    write_tiny_model(tmp_path)
    settings = make_settings(tmp_path, onnx_cache_dir=tmp_path / "cache", memory_trim_idle_s=0)
    engine = Engine(settings)
    await engine.start()
    await engine.stop()
    kept = json.loads((tmp_path / "cache" / "load-times.json").read_text())
    assert set(kept) == {"tiny"} and kept["tiny"] > 0
    assert Engine(settings).load_times.remaining_s(["tiny"]) == pytest.approx(kept["tiny"])

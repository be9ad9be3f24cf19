"""Sample a running server with py-spy and say where its CPU went (``pip install py-spy``).

Why: a throughput or latency target that is missed needs a reason, and the reason is in
the server's stacks. ``py-spy record --format raw`` writes collapsed stacks
(``frame;frame;...;leaf count``); :func:`summarize` turns them into the share of active
samples per function (self and inclusive) and per coarse category (the model forward,
JPEG decoding, preprocessing, HTTP and JSON, ...). Idle threads are not sampled, so the
shares are of the time some thread of the server was busy.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# First match wins, tested on the stack from the leaf up: "where is the time spent".
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "model forward (torch)",
        (
            "app/tasks/classify/model.py",
            "torch/",
            "timm/",
            "open_clip/",
            "app/equivariance/",
            "app/backbones/base.py",
            "app/backbones/efficientnet.py",
        ),
    ),
    ("preprocess (crop+resize)", ("app/backbones/preprocess.py",)),
    ("JPEG decode (PIL)", ("PIL/", "app/api/images.py")),
    ("multipart/form parsing", ("multipart/", "starlette/formparsers.py", "python_multipart")),
    ("JSON encode/decode", ("json/", "pydantic", "fastapi/encoders.py")),
    ("HTTP server (uvicorn/h11/httptools)", ("uvicorn/", "h11/", "httptools")),
    ("framework (starlette/fastapi/anyio)", ("starlette/", "fastapi/", "anyio/")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("asyncio event loop", ("asyncio/",)),
)


def available() -> bool:
    return shutil.which("py-spy") is not None


def start_record(pid: int, out: Path, duration_s: float, rate: int = 50, native: bool = False) -> subprocess.Popen:
    """Start ``py-spy record`` on ``pid`` for ``duration_s`` (it stops by itself)."""
    argv = [
        "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(duration_s))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
        "--subprocesses",
    ]
    if native:
        argv.append("--native")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def parse_frame(frame: str) -> tuple[str, str]:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return match["func"], match["file"]


def categorize(frames: list[tuple[str, str]]) -> str:
    for _, file in reversed(frames):  # from the leaf up
        for name, needles in CATEGORIES:
            if any(n in file for n in needles):
                return name
    return "other"


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Shares (% of active samples) per category, per leaf function (self), per function (inclusive)."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw_frames = stack.split(";")
        thread = raw_frames[0] if raw_frames and raw_frames[0].startswith(("thread", "process")) else ""
        frames = [parse_frame(f) for f in raw_frames if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        total += count
        threads[thread or "?"] += count
        func, file = frames[-1]
        self_time[f"{func} ({_short(file)})"] += count
        for name in {f"{f} ({_short(p)})" for f, p in frames}:
            inclusive[name] += count
        categories[categorize(frames)] += count

    def shares(counter: Counter[str], n: int | None = None) -> list[list[Any]]:
        return [[k, round(100 * v / total, 1)] for k, v in counter.most_common(n)] if total else []

    return {
        "samples": total,
        "categories_pct": shares(categories),
        "self_pct": shares(self_time, top),
        "inclusive_pct": shares(inclusive, top),
        "threads_pct": shares(threads, 10),
    }


def _short(file: str) -> str:
    """``.../site-packages/torch/nn/modules/conv.py`` -> ``torch/nn/modules/conv.py``."""
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file.rsplit("/main/", 1)[-1]

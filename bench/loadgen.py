"""A bounded HTTP load generator for equiserve (and its peers), plus a server it can start.

Why a home-made one: the numbers we need are not only latency and throughput but what the
server says about each answer (``timing.batch_size``) and, for the reliability checks, that
every request got exactly one answer (``X-Request-ID`` echoed back). Everything is bounded,
so a run always stops by itself:

* closed loop (:func:`run_closed_loop`): ``concurrency`` workers, each sending requests
  back to back for ``duration_s`` (or until ``max_requests``); the connection pool holds
  exactly ``concurrency`` connections;
* open loop (:func:`run_open_loop`): arrivals at a fixed ``rate`` for ``duration_s``
  whatever the server does (overload), with at most ``max_inflight`` requests in flight:
  an arrival that finds the client full is counted as ``client_dropped`` and not sent.

Every request has a client timeout, and a run waits for its last requests at most that
long. Bodies are real photos (scikit-image's samples and darknet's JPEGs), encoded ONCE
into complete multipart/JSON bodies, so the client spends its CPU on HTTP only: the client
shares the machine's cores with the server under test (its own CPU time is recorded).

Only loopback addresses are allowed as targets (:func:`check_loopback`).

As a script (a quick load test of a running server, or of one it starts itself)::

    python bench/loadgen.py --url http://127.0.0.1:8000 --concurrency 8 --duration 10
    python bench/loadgen.py --serve --concurrency 8 --duration 10 -- --max-batch-size 8
    python bench/loadgen.py --serve --rate 20 --duration 10 --max-inflight 64
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import benchlib
import httpx
import numpy as np
from benchlib import REPO_ROOT

DARKNET_DATA = Path("/usr/share/darknet/data")
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle")
DEFAULT_MODEL = "imagenet-effnet-c4"
TIMING = re.compile(rb'"timing":(\{[^{}]*\})')


# -- targets ---------------------------------------------------------------------------------


def check_loopback(url: str) -> None:
    """Refuse any target that is not on this machine: load tests only ever hit loopback."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing to send load to {host!r}: only loopback addresses (127.0.0.1, ::1) are allowed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- photos and request bodies ------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    name: str
    data: bytes  # encoded file bytes
    content_type: str
    width: int
    height: int


def _encode(array: np.ndarray, fmt: str = "JPEG", quality: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def skimage_photo(name: str) -> np.ndarray:
    """scikit-image's sample photos; "motorcycle" is the left view of ``stereo_motorcycle``."""
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def load_photos(names: Sequence[str] | None = None, *, include_darknet: bool = True) -> list[Photo]:
    """Real JPEG photos: scikit-image's samples (encoded at quality 90) and darknet's files as
    they are on disk (``/usr/share/darknet/data/*.jpg``, Debian package ``darknet``)."""
    from PIL import Image

    photos = []
    for name in names or SKIMAGE_PHOTOS:
        try:
            array = skimage_photo(name)
        except Exception as exc:  # a sample that needs a download on a machine without network
            print(f"skipping scikit-image photo {name!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        photos.append(Photo(name, _encode(array), "image/jpeg", array.shape[1], array.shape[0]))
    if include_darknet:
        for path in sorted(DARKNET_DATA.glob("*.jpg")):
            with Image.open(path) as image:
                width, height = image.size
            photos.append(Photo(path.stem, path.read_bytes(), "image/jpeg", width, height))
    if not photos:
        raise RuntimeError("no photos: install scikit-image and/or the Debian package darknet")
    return photos


def resized_photo(photo: Photo, max_side: int, fmt: str = "JPEG") -> Photo:
    """The photo scaled so that its longer side is ``max_side`` (up or down), re-encoded."""
    from PIL import Image

    with Image.open(io.BytesIO(photo.data)) as image:
        rgb = image.convert("RGB")
    scale = max_side / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    array = np.asarray(rgb.resize(size, Image.Resampling.BILINEAR))
    content_type = "image/png" if fmt == "PNG" else "image/jpeg"
    return Photo(f"{photo.name}@{max_side}{'.png' if fmt == 'PNG' else ''}", _encode(array, fmt), content_type, *size)


def encode_multipart(
    files: Sequence[tuple[str, str, str, bytes]], fields: Sequence[tuple[str, str]] = ()
) -> tuple[bytes, str]:
    """A complete multipart/form-data body: ``files`` as (field, filename, content type, data)."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, content_type, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        parts.append(head + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class RequestTemplate:
    """One kind of request, its body built once. ``expect``: the statuses that are correct
    for it (a bad request expects its 4xx); ``weight``: how often a mix picks it."""

    kind: str
    method: str
    path: str
    body: bytes = b""
    content_type: str | None = None
    expect: tuple[int, ...] = (200,)
    weight: float = 1.0


def classify_path(model: str) -> str:
    return f"/v1/models/{model}/classify"


def multipart_classify(
    photos: Sequence[Photo],
    model: str = DEFAULT_MODEL,
    *,
    method: str | None = "equitune",
    top_k: int | None = 3,
    kind: str | None = None,
    weight: float = 1.0,
    path: str | None = None,
) -> RequestTemplate:
    """A classify request with one ``image`` part per photo (several photos: one request)."""
    fields = [(k, str(v)) for k, v in (("method", method), ("top_k", top_k)) if v is not None]
    files = [
        ("image", f"{p.name}.{'png' if p.content_type == 'image/png' else 'jpg'}", p.content_type, p.data)
        for p in photos
    ]
    body, content_type = encode_multipart(files, fields)
    name = kind or f"multipart:{'+'.join(p.name for p in photos)}:{method}"
    return RequestTemplate(name, "POST", path or classify_path(model), body, content_type, weight=weight)


def json_classify(
    photos: Sequence[Photo],
    model: str = DEFAULT_MODEL,
    *,
    method: str | None = "equitune",
    top_k: int | None = 3,
    kind: str | None = None,
    weight: float = 1.0,
) -> RequestTemplate:
    payload: dict[str, Any] = {"images": [{"b64": base64.b64encode(p.data).decode()} for p in photos]}
    if method is not None:
        payload["method"] = method
    if top_k is not None:
        payload["top_k"] = top_k
    name = kind or f"json:{'+'.join(p.name for p in photos)}:{method}"
    return RequestTemplate(
        name, "POST", classify_path(model), json.dumps(payload).encode(), "application/json", weight=weight
    )


def photo_templates(
    photos: Sequence[Photo], model: str = DEFAULT_MODEL, method: str = "equitune", path: str | None = None
) -> list[RequestTemplate]:
    """One single-image multipart classify request per photo: the standard load."""
    return [multipart_classify([p], model, method=method, path=path) for p in photos]


# -- records and summaries ---------------------------------------------------------------------------


@dataclass
class Record:
    """One request as the client saw it. ``status`` 0 = no HTTP answer (``error`` says why)."""

    request_id: str
    kind: str
    start: float  # seconds since the run started
    latency: float  # seconds from send to the full response body
    status: int
    expected: bool
    batch_size: int | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None
    echoed_id: str | None = None
    error: str | None = None

    @property
    def end(self) -> float:
        return self.start + self.latency


@dataclass
class LoadResult:
    mode: str  # "closed" or "open"
    target: str
    duration_s: float  # the sending window
    warmup_s: float  # records that started earlier are left out of the statistics
    records: list[Record]
    wall_s: float  # the sending window plus the wait for the last answers
    client_cpu_s: float
    config: dict[str, Any] = field(default_factory=dict)
    client_dropped: int = 0  # open loop: arrivals not sent because max_inflight were in flight
    max_schedule_lag_s: float = 0.0  # open loop: how late the client sent an arrival at worst

    def measured(self) -> list[Record]:
        return [r for r in self.records if r.start >= self.warmup_s]

    def summary(self) -> dict[str, Any]:
        """Throughput of 200s over the window after warmup; latency of those 200s; status tally."""
        window = max(self.duration_s - self.warmup_s, 1e-9)
        measured = self.measured()
        ok = [r for r in measured if r.status == 200]
        ok_in_window = [r for r in self.records if r.status == 200 and self.warmup_s <= r.end <= self.duration_s]
        statuses = Counter(str(r.status) if r.status else f"error:{r.error}" for r in measured)
        batch_sizes = [r.batch_size for r in ok if r.batch_size is not None]
        queue = [r.queue_ms for r in ok if r.queue_ms is not None]
        inference = [r.inference_ms for r in ok if r.inference_ms is not None]
        # Per request: what the answer cost beyond its batch's forward pass (HTTP, parsing,
        # decoding, preprocessing, queueing), and beyond queue + forward (everything else).
        timed = [r for r in ok if r.inference_ms is not None and r.queue_ms is not None]
        outside_batch = [r.latency * 1e3 - r.inference_ms for r in timed]  # type: ignore[operator]
        outside_server = [r.latency * 1e3 - r.inference_ms - r.queue_ms for r in timed]  # type: ignore[operator]
        return {
            "mode": self.mode,
            "sent": len(measured),
            "ok": len(ok),
            "throughput_rps": round(len(ok_in_window) / window, 3),
            "offered_rps": round(len(measured) / window, 3),
            "latency": benchlib.latency_summary_ms([r.latency for r in ok]),
            "mean_batch_size": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
            "server_queue_ms_p50": round(float(np.median(queue)), 2) if queue else None,
            "server_inference_ms_p50": round(float(np.median(inference)), 2) if inference else None,
            "outside_batch_ms_p50": round(float(np.median(outside_batch)), 2) if outside_batch else None,
            "outside_queue_and_batch_ms_p50": round(float(np.median(outside_server)), 2) if outside_server else None,
            "status_counts": dict(sorted(statuses.items())),
            "transport_errors": sum(1 for r in measured if r.status == 0),
            "unexpected": sum(1 for r in measured if not r.expected),
            "client_dropped": self.client_dropped,
            "client_cpu_fraction": round(self.client_cpu_s / max(self.wall_s, 1e-9), 3),
            "max_schedule_lag_ms": round(self.max_schedule_lag_s * 1e3, 1),
            "warmup_s": self.warmup_s,
            "window_s": round(window, 2),
        }

    def to_json(self, include_records: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "config": self.config, "summary": self.summary()}
        if include_records:
            out["records"] = [
                [r.request_id, r.kind, round(r.start, 4), round(r.latency * 1e3, 2), r.status, r.batch_size]
                for r in self.records
            ]
            out["records_columns"] = ["request_id", "kind", "start_s", "latency_ms", "status", "batch_size"]
        return out


def _parse_timing(body: bytes) -> tuple[int | None, float | None, float | None]:
    """The server's ``timing`` object, found without parsing the whole answer (client CPU)."""
    match = TIMING.search(body)
    if match is None:
        return None, None, None
    try:
        timing = json.loads(match.group(1))
    except ValueError:
        return None, None, None
    return timing.get("batch_size"), timing.get("queue_ms"), timing.get("inference_ms")


class Picker:
    """Chooses the next template: round robin, or weighted random with a fixed seed."""

    def __init__(self, templates: Sequence[RequestTemplate], *, weighted: bool = False, seed: int = 0) -> None:
        if not templates:
            raise ValueError("no request templates")
        self.templates = list(templates)
        self.weighted = weighted
        self._random = random.Random(seed)
        self._weights = [t.weight for t in self.templates]
        self._i = 0

    def next(self) -> RequestTemplate:
        if self.weighted:
            return self._random.choices(self.templates, self._weights)[0]
        template = self.templates[self._i % len(self.templates)]
        self._i += 1
        return template


async def send_one(
    client: aiohttp.ClientSession, template: RequestTemplate, request_id: str, t0: float, headers: dict[str, str]
) -> Record:
    """Send one request and record what came back; never raises (errors become records)."""
    request_headers = {**headers, "x-request-id": request_id}
    if template.content_type:
        request_headers["content-type"] = template.content_type
    start = time.perf_counter()
    try:
        async with client.request(
            template.method, template.path, data=template.body or None, headers=request_headers
        ) as response:
            body = await response.read()
            status, echoed_id = response.status, response.headers.get("x-request-id")
    except TimeoutError as exc:  # aiohttp's timeouts are asyncio's
        return Record(
            request_id,
            template.kind,
            start - t0,
            time.perf_counter() - start,
            0,
            False,
            error=f"timeout:{type(exc).__name__}",
        )
    except aiohttp.ClientError as exc:
        return Record(
            request_id, template.kind, start - t0, time.perf_counter() - start, 0, False, error=type(exc).__name__
        )
    latency = time.perf_counter() - start
    batch_size = queue_ms = inference_ms = None
    if status == 200:
        batch_size, queue_ms, inference_ms = _parse_timing(body)
    return Record(
        request_id,
        template.kind,
        start - t0,
        latency,
        status,
        status in template.expect,
        batch_size,
        queue_ms,
        inference_ms,
        echoed_id,
    )


def _client(base_url: str, connections: int, timeout_s: float) -> aiohttp.ClientSession:
    """aiohttp, not httpx: the client shares the 2 cores with the server under test, and at
    1024 connections httpx's pool spent ~15 ms of CPU per request (aiohttp: well under 1)."""
    check_loopback(base_url)
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 10.0))
    # trust_env=False: no proxies from the environment; loopback only.
    return aiohttp.ClientSession(
        base_url=base_url, connector=connector, timeout=timeout, trust_env=False, auto_decompress=False
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_closed_loop(
    base_url: str,
    templates: Sequence[RequestTemplate],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.0,
    max_requests: int = 100_000,
    timeout_s: float = 60.0,
    id_prefix: str | None = None,
    weighted: bool = False,
    seed: int = 0,
    headers: dict[str, str] | None = None,
    on_tick: Callable[[float], None] | None = None,
) -> LoadResult:
    """``concurrency`` workers send back to back until ``duration_s`` or ``max_requests``.

    A worker starts no request after the deadline; the run then waits for the ones in
    flight (each bounded by ``timeout_s``). ``on_tick(elapsed)`` is called about once a
    second (e.g. to sample the server's memory).
    """
    prefix = id_prefix or f"closed-{uuid.uuid4().hex[:8]}"
    picker = Picker(templates, weighted=weighted, seed=seed)
    records: list[Record] = []
    counter = iter(range(max_requests))
    cpu0 = _cpu_seconds()
    async with _client(base_url, concurrency, timeout_s) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def worker() -> None:
            while time.perf_counter() < deadline:
                n = next(counter, None)
                if n is None:
                    return
                records.append(await send_one(client, picker.next(), f"{prefix}-{n}", t0, headers or {}))

        async def ticker() -> None:
            while on_tick is not None and time.perf_counter() < deadline:
                on_tick(time.perf_counter() - t0)
                await asyncio.sleep(1.0)

        tick = asyncio.ensure_future(ticker())
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), duration_s + timeout_s + 10)
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick
        wall = time.perf_counter() - t0
    config = {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "timeout_s": timeout_s,
        "max_requests": max_requests,
        "templates": [t.kind for t in templates],
    }
    return LoadResult("closed", base_url, duration_s, warmup_s, records, wall, _cpu_seconds() - cpu0, config)


async def run_open_loop(
    base_url: str,
    templates: Sequence[RequestTemplate],
    *,
    rate: float,
    duration_s: float,
    max_inflight: int,
    warmup_s: float = 0.0,
    max_requests: int = 100_000,
    timeout_s: float = 60.0,
    id_prefix: str | None = None,
    weighted: bool = False,
    seed: int = 0,
    headers: dict[str, str] | None = None,
    on_tick: Callable[[float], None] | None = None,
) -> LoadResult:
    """Arrivals every ``1/rate`` seconds for ``duration_s`` (at most ``max_requests``), each
    sent at once unless ``max_inflight`` are in flight (then counted, not sent). The
    schedule does not wait for answers: that is what overloads a server."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    prefix = id_prefix or f"open-{uuid.uuid4().hex[:8]}"
    picker = Picker(templates, weighted=weighted, seed=seed)
    records: list[Record] = []
    inflight: set[asyncio.Task] = set()
    dropped = 0
    max_lag = 0.0
    cpu0 = _cpu_seconds()
    async with _client(base_url, max_inflight, timeout_s) as client:
        t0 = time.perf_counter()
        next_tick = 0.0
        n = 0
        while n < max_requests:
            scheduled = t0 + n / rate
            if scheduled - t0 >= duration_s:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            max_lag = max(max_lag, now - scheduled)
            if on_tick is not None and now - t0 >= next_tick:
                on_tick(now - t0)
                next_tick += 1.0
            if len(inflight) >= max_inflight:
                dropped += 1
            else:
                task = asyncio.ensure_future(send_one(client, picker.next(), f"{prefix}-{n}", t0, headers or {}))
                task.add_done_callback(lambda t: (inflight.discard(t), records.append(t.result())))
                inflight.add(task)
            n += 1
        if inflight:
            await asyncio.wait(set(inflight), timeout=timeout_s + 10)
        wall = time.perf_counter() - t0
    config = {
        "rate": rate,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "max_inflight": max_inflight,
        "timeout_s": timeout_s,
        "max_requests": max_requests,
        "templates": [t.kind for t in templates],
    }
    return LoadResult(
        "open", base_url, duration_s, warmup_s, records, wall, _cpu_seconds() - cpu0, config, dropped, max_lag
    )


# -- a server in a subprocess ----------------------------------------------------------------------


def _proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_kib(pid: int) -> int | None:
    """``VmRSS`` of one process, from ``/proc/<pid>/status``."""
    return _proc_status_kib(pid, "VmRSS")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (LitServe and uvicorn workers are children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds_of(pid: int) -> float:
    """utime + stime of one process (``/proc/<pid>/stat``), in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ManagedServer:
    """A server command in its own process group, with its output in a log file.

    ``start()`` launches it, ``wait_ready()`` polls ``ready_path`` until 200, ``stop()``
    sends SIGTERM to the group (SIGKILL after ``stop_timeout_s``). Use as a context
    manager so that a failing benchmark never leaves a server behind.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        *,
        ready_path: str = "/health/ready",
        env: dict[str, str] | None = None,
        cwd: Path = REPO_ROOT,
        startup_timeout_s: float = 300.0,
        stop_timeout_s: float = 40.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self.startup_s: float | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self) -> ManagedServer:
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self) -> ManagedServer:
        started = time.monotonic()
        deadline = started + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"server {self.name} exited early:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2, trust_env=False).status_code == 200:
                    self.startup_s = time.monotonic() - started
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server {self.name} not ready after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def rss_kib(self, tree: bool = False) -> int | None:
        """``VmRSS`` of the server process (``tree``: plus all its descendants)."""
        own = rss_kib(self.pid)
        if not tree or own is None:
            return own
        return own + sum(rss_kib(p) or 0 for p in descendants(self.pid))

    def cpu_s(self) -> float:
        """CPU seconds used by the server and its live descendants so far."""
        return cpu_seconds_of(self.pid) + sum(cpu_seconds_of(p) for p in descendants(self.pid))

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(10)

    def __enter__(self) -> ManagedServer:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def equiserve_server(
    port: int | None = None,
    *extra: str,
    model: str = DEFAULT_MODEL,
    models_dir: Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
    name: str = "equiserve",
    cwd: Path = REPO_ROOT,
) -> ManagedServer:
    """``python -m app serve`` on 127.0.0.1 serving ``model``; ``extra`` are more serve flags.
    ``cwd``: the checkout whose ``app`` runs (another revision's worktree, to compare)."""
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "app",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--models",
        model,
        "--device",
        device,
        "--log-level",
        "warning",
    ]
    if models_dir is not None:
        argv += ["--models-dir", str(models_dir)]
    return ManagedServer(name, [*argv, *extra], port, env=thread_env(threads), cwd=cwd)


def thread_env(threads: int | None) -> dict[str, str]:
    """Environment that pins torch's intra-op threads in a server subprocess (None: torch's default)."""
    if threads is None:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# -- tables ----------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ("run", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "sent", "statuses", "client cpu")


def summary_row(label: str, summary: dict[str, Any]) -> list[str]:
    lat = summary["latency"]
    statuses = " ".join(f"{k}:{v}" for k, v in summary["status_counts"].items())
    return [
        label,
        benchlib.fmt(summary["throughput_rps"], 2),
        benchlib.fmt(lat["p50_ms"]),
        benchlib.fmt(lat["p95_ms"]),
        benchlib.fmt(lat["p99_ms"]),
        benchlib.fmt(summary["mean_batch_size"], 2),
        str(summary["sent"]),
        statuses,
        f"{summary['client_cpu_fraction'] * 100:.0f}%",
    ]


# -- command line ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="arguments after -- go to `python -m app serve` (--serve)"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server (loopback only)")
    target.add_argument("--serve", action="store_true", help="start `python -m app serve` on a free port")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--method", default="equitune", help="classify method sent with each request")
    parser.add_argument("--concurrency", type=int, default=8, help="closed loop: workers")
    parser.add_argument("--rate", type=float, default=None, help="open loop: arrivals per second (instead of closed)")
    parser.add_argument("--max-inflight", type=int, default=256, help="open loop: most requests in flight")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds left out of the statistics")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    parser.add_argument("--threads", type=int, default=None, help="--serve: torch threads in the server")
    parser.add_argument("--out", type=Path, default=None, help="write the summary (and records) as JSON")
    args, extra = parser.parse_known_args(argv)
    args.serve_args = [a for a in extra if a != "--"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    photos = load_photos()
    templates = photo_templates(photos, args.model, args.method)
    server = equiserve_server(None, *args.serve_args, model=args.model, threads=args.threads) if args.serve else None
    stack = contextlib.ExitStack()
    with stack:
        if server is not None:
            stack.enter_context(server)
        url = server.base_url if server is not None else args.url
        common: dict[str, Any] = {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "max_requests": args.max_requests,
            "timeout_s": args.timeout,
        }
        if args.rate is not None:
            run = run_open_loop(url, templates, rate=args.rate, max_inflight=args.max_inflight, **common)
        else:
            run = run_closed_loop(url, templates, concurrency=args.concurrency, **common)
        result = asyncio.run(run)
    summary = result.summary()
    label = f"rate {args.rate}/s" if args.rate is not None else f"concurrency {args.concurrency}"
    benchlib.print_table(f"loadgen against {url}", SUMMARY_COLUMNS, [summary_row(label, summary)])
    if args.out is not None:
        benchlib.write_json(
            args.out,
            {
                "machine": benchlib.machine_info(),
                "command": benchlib.command_line(),
                **result.to_json(include_records=True),
            },
        )
    return 0 if summary["transport_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

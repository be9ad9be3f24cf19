"""Benchmark: the equiserve service against its raw fused ceiling and against two peers (CPU).

Issue #6, items 1-3. One run measures, on the same machine and model (EfficientNet-Lite0,
real ImageNet weights, group c4, method equitune, float32 on the CPU):

1. **raw ceiling**: requests/s of the fused pass alone (``ClassifyModel`` on ``B`` already
   preprocessed photos: one ``B·|G|`` forward, combination, results), in this process, no
   HTTP, at each batch size ``B`` (interleaved round-robin, median of the rounds);
2. **the service under load**: ``python -m app serve`` on a free loopback port, driven by
   the closed-loop load generator (``bench/loadgen.py``) at each concurrency with real JPEG
   photos: throughput, p50/p95/p99, the mean batch size the server reports, statuses; and
   the ratio service / raw ceiling at the service's own mean batch size, timed again in this
   process right after each segment (``raw_paired``, server idle) so that both were measured
   minutes apart at most on a machine whose load changes;
3. **peers**: the same load against ``bench/peers/naive_server.py`` (one request = |G|
   forwards in a Python loop, no batching) and ``bench/peers/litserve_server.py`` (LitServe's
   batching around equiserve's decoder and fused runner). Servers run one at a time, so an
   idle one (LitServe's worker polls its queue) never steals CPU from the one measured.

Targets (reported, never asserted): service throughput at concurrency 32 ≥ 85 % of the raw
ceiling at the same batch size; p50 at concurrency 1 within 5 ms of one raw forward; ≥ 3×
the naive server at concurrency 32; ahead of LitServe. ``--profile`` adds a py-spy profile
of equiserve at the highest concurrency (a separate segment, not used for the numbers).

Run from the repository root (default: ~10-12 min on 2 shared cores; ``--quick``: ~3 min)::

    python bench/bench_service.py [--quick] [--concurrency 1 8 32] [--duration 30] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import benchlib
import loadgen
import numpy as np
import pyspy
from benchlib import REPO_ROOT, RESULTS_DIR

DEFAULT_OUT = RESULTS_DIR / "service_cpu.json"
MODEL = loadgen.DEFAULT_MODEL
METHOD = "equitune"
# "engine": equiserve's Engine in this process, no HTTP (what the HTTP layer costs is the difference)
ALL_SERVERS = ("equiserve", "engine", "naive", "naive-ort", "naive-async", "litserve")


# -- 1. the raw ceiling --------------------------------------------------------------------------


def engine_settings(model: str, models_dir: Path | None, runtime: str, **overrides: Any) -> Any:
    """The settings the served equiserve runs with, for an ``Engine`` in this process."""
    from app.config import DEFAULT_MODELS_DIR, Settings

    return Settings(
        models=[model], models_dir=models_dir or DEFAULT_MODELS_DIR, device="cpu", runtime=runtime, **overrides
    )


class RawBench:
    """The served model in this process (loaded by the engine, as the server loads it): its
    fused batch function on preprocessed real photos, no HTTP, no queue."""

    def __init__(
        self, photos: Sequence[loadgen.Photo], model: str, models_dir: Path | None, runtime: str = "auto"
    ) -> None:
        from app.backbones.images import decode_image
        from app.engine.engine import Engine
        from app.equivariance import Method
        from app.tasks.classify.model import ImageItem

        engine = Engine(engine_settings(model, models_dir, runtime, warmup=False))
        engine.load()
        self.loaded = engine.models[model]
        pixels = [
            self.loaded.preprocess(
                decode_image(p.data, max_pixels=50_000_000, min_side=self.loaded.backbone.input_size)
            )
            for p in photos
        ]
        self._items = [ImageItem(pixels[i % len(pixels)], Method(METHOD), 3) for i in range(len(pixels))]
        self._warm: set[int] = set()

    def items(self, batch_size: int) -> list[Any]:
        return [self._items[i % len(self._items)] for i in range(batch_size)]

    def call(self, batch_size: int) -> float:
        """Seconds for one fused call at ``batch_size`` (the first call per size is not timed)."""
        items = self.items(batch_size)
        if batch_size not in self._warm:
            self.loaded(items)
            self._warm.add(batch_size)
        t0 = time.perf_counter()
        self.loaded(items)
        return time.perf_counter() - t0

    def sweep(self, batch_sizes: Sequence[int], *, rounds: int, budget_s: float) -> dict[str, Any]:
        """Every round times each size once, starting from a different one (rotation), so
        background load spreads over all sizes; at least 2 rounds, then until the budget."""
        import torch

        samples: dict[int, list[float]] = {b: [] for b in batch_sizes}
        started = time.perf_counter()
        for b in batch_sizes:
            self.call(b)  # warm every shape
        gc.collect()
        for r in range(rounds):
            if r >= 2 and time.perf_counter() - started > budget_s:
                break
            shift = r % len(batch_sizes)
            for b in (*batch_sizes[shift:], *batch_sizes[:shift]):
                samples[b].append(self.call(b))
        info = {
            "backbone": self.loaded.backbone.name,
            "group": self.loaded.spec.group,
            "group_order": self.loaded.model.group.order,
            "runtime": self.loaded.runtime,
            "torch_threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        return {"info": info, "results": [raw_entry(b, samples[b]) for b in batch_sizes]}

    def paired(self, batch_size: int, *, reps: int, budget_s: float) -> dict[str, Any]:
        """The raw pass at exactly ``batch_size``, right after a load segment (server idle)."""
        samples: list[float] = []
        started = time.perf_counter()
        while len(samples) < reps and (len(samples) < 1 or time.perf_counter() - started < budget_s):
            samples.append(self.call(batch_size))
        return raw_entry(batch_size, samples)


def raw_entry(batch_size: int, samples_s: Sequence[float]) -> dict[str, Any]:
    ms = np.asarray(samples_s) * 1e3
    median = float(np.median(ms))
    return {
        "batch_size": batch_size,
        "n": len(ms),
        "median_ms": round(median, 2),
        "p10_ms": round(float(np.percentile(ms, 10)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "requests_per_s": round(batch_size / (median / 1e3), 3),
        "samples_ms": [round(float(v), 2) for v in ms],
    }


def raw_rps_at(raw: dict[str, Any], batch_size: float) -> float | None:
    """The raw ceiling at a (fractional) batch size: linear in log2(B) between measured sizes."""
    points = sorted((r["batch_size"], r["requests_per_s"]) for r in raw["results"])
    if not points or batch_size is None:
        return None
    if batch_size <= points[0][0]:
        return points[0][1]
    if batch_size >= points[-1][0]:
        return points[-1][1]
    for (b0, r0), (b1, r1) in itertools.pairwise(points):
        if b0 <= batch_size <= b1:
            w = (math.log2(batch_size) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
            return r0 + w * (r1 - r0)
    return None


# -- the stages of one request outside its forward pass ---------------------------------------------


def stage_costs(templates: Sequence[loadgen.RequestTemplate], input_size: int, reps: int) -> dict[str, Any]:
    """Median milliseconds per request of each stage the server runs outside the forward pass,
    in this process, one thread, on the same request bodies: parsing the multipart body
    (starlette, as the route does), decoding the JPEG (PIL's draft mode, as before issue #17,
    and the decoder served now) and the crop + resize. Interleaved per round, so background
    load spreads over all stages. What HTTP itself costs is the rest of the request's time
    outside its batch (``analyse``)."""
    import torch
    from starlette.requests import Request

    from app.backbones import images as decode
    from app.backbones.preprocess import pixels_from_uint8

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a preprocessing thread runs one image at a time

    async def parse(body: bytes, content_type: str) -> bytes:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        request = Request({"type": "http", "method": "POST", "headers": headers}, receive)
        form = await request.form(max_files=16, max_fields=1008)
        return await form.getlist("image")[0].read()

    def pil_decode(data: bytes) -> Any:
        fast, decode.simplejpeg = decode.simplejpeg, None
        try:
            return decode.decode_image(data, max_pixels=50_000_000, min_side=input_size)
        finally:
            decode.simplejpeg = fast

    loop = asyncio.new_event_loop()
    bodies = [(t.body, t.content_type or "") for t in templates]
    files = [loop.run_until_complete(parse(body, ct)) for body, ct in bodies]
    arrays = [decode.decode_image(f, max_pixels=50_000_000, min_side=input_size) for f in files]
    stages: dict[str, Callable[[int], Any]] = {
        "multipart_parse": lambda i: loop.run_until_complete(parse(*bodies[i])),
        "decode_pil_draft": lambda i: pil_decode(files[i]),
        "decode_served": lambda i: decode.decode_image(files[i], max_pixels=50_000_000, min_side=input_size),
        "crop_resize": lambda i: pixels_from_uint8(arrays[i], input_size),
    }
    samples: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(reps):
        for i in range(len(files)):
            for name, run in stages.items():
                t0 = time.perf_counter()
                run(i)
                samples[name].append(time.perf_counter() - t0)
    loop.close()
    torch.set_num_threads(threads)
    return {
        "decoder": "simplejpeg" if decode.simplejpeg is not None else "PIL",
        "requests": len(files),
        "reps": reps,
        "median_ms": {name: round(float(np.median(v)) * 1e3, 3) for name, v in samples.items()},
        "mean_ms": {name: round(float(np.mean(v)) * 1e3, 3) for name, v in samples.items()},
    }


# -- 2/3. servers under load ---------------------------------------------------------------------------


async def engine_closed_loop(
    engine: Any, model: str, photos: Sequence[loadgen.Photo], concurrency: int, duration_s: float, warmup_s: float
) -> loadgen.LoadResult:
    """The closed loop of ``loadgen.run_closed_loop``, against ``Engine.infer`` in this process:
    the same photos, method and admission, without HTTP (what the HTTP layer costs is the
    difference to the served segment)."""
    from app.tasks.classify.messages import ClassifyRequest, EncodedImage

    records: list[loadgen.Record] = []
    started = time.perf_counter()
    cpu_before = time.process_time()
    counter = itertools.count()

    async def worker(w: int) -> None:
        while time.perf_counter() - started < duration_s:
            i = next(counter)
            photo = photos[i % len(photos)]
            request = ClassifyRequest([EncodedImage(photo.data, "image/jpeg")], METHOD, 3)
            t0 = time.perf_counter()
            rid = f"engine-{i}"
            try:
                timing = (await engine.infer(model, "classify", request, request_id=rid)).timing
            except Exception as exc:  # an engine error: no answer, counted like a transport error
                records.append(loadgen.Record(rid, "engine", t0 - started, time.perf_counter() - t0, 0, False,
                                              error=type(exc).__name__))  # fmt: skip
                continue
            latency = time.perf_counter() - t0
            records.append(
                loadgen.Record(rid, "engine", t0 - started, latency, 200, True, batch_size=timing.batch_size,
                               queue_ms=timing.queue_ms, inference_ms=timing.inference_ms)
            )  # fmt: skip

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return loadgen.LoadResult(
        "closed", "engine", duration_s, warmup_s, records, time.perf_counter() - started,
        time.process_time() - cpu_before,
    )  # fmt: skip


def load_engine(args: argparse.Namespace, photos: Sequence[loadgen.Photo]) -> dict[str, Any]:
    """Every concurrency level against an ``Engine`` in this process (``--servers engine``)."""
    from app.engine.engine import Engine

    engine = Engine(
        engine_settings(args.model, args.models_dir, args.runtime, max_batch_size=args.max_batch_size,
                        max_wait_ms=args.max_wait_ms)
    )  # fmt: skip

    async def run() -> list[dict[str, Any]]:
        await engine.start()
        try:
            segments = []
            for concurrency in args.concurrency:
                print(f"[engine] concurrency {concurrency} for {args.duration:.0f} s ...", file=sys.stderr, flush=True)
                load_before = benchlib.load_average()
                result = await engine_closed_loop(engine, args.model, photos, concurrency, args.duration, args.warmup)
                summary = {**result.summary(), "load_average_before": load_before}
                segments.append({"concurrency": concurrency, **summary, "load_average_after": benchlib.load_average()})
            return segments
        finally:
            await engine.stop()

    return {"server": "engine", "argv": ["in process: Engine.infer"], "segments": asyncio.run(run())}


def server_factory(name: str, args: argparse.Namespace) -> Callable[[int], loadgen.ManagedServer]:
    """How to start each server on a given port, all serving ``args.model`` alike."""
    env = loadgen.thread_env(args.threads)
    py = sys.executable
    model_args = ["--model", args.model] + (["--models-dir", str(args.models_dir)] if args.models_dir else [])
    if name == "equiserve" or name.startswith(("equiserve:", "equiserve@")):
        extra = [*args.equiserve_args]
        revision, cwd = None, REPO_ROOT
        if "@" in name:  # "equiserve@REV": the same server at another git revision, in a worktree
            revision = name.split("@", 1)[1]
            cwd = benchlib.worktree(revision)
        if ":" in name:  # "equiserve:b4" -> max batch 4
            extra += ["--max-batch-size", name.split(":", 1)[1].removeprefix("b")]
        else:
            extra += ["--max-batch-size", str(args.max_batch_size)]
        extra += ["--max-wait-ms", str(args.max_wait_ms), "--runtime", args.runtime]
        models_dir = args.models_dir or cwd / "models"
        return lambda port: loadgen.equiserve_server(
            port, *extra, model=args.model, models_dir=models_dir, threads=args.threads, name=name, cwd=cwd
        )
    if name in ("naive", "naive-ort", "naive-async"):
        mode = "async" if name == "naive-async" else "sync"
        runtime = "onnxruntime" if name == "naive-ort" else "torch"  # naive: eager torch, as users write it
        script = [py, "bench/peers/naive_server.py", "--mode", mode, "--runtime", runtime, *model_args]
        return lambda port: loadgen.ManagedServer(name, [*script, "--port", str(port)], port, env=env)
    if name == "litserve":
        batching = ["--max-batch-size", str(args.max_batch_size), "--batch-timeout-ms", str(args.max_wait_ms)]
        batching += ["--runtime", args.runtime]  # the same runner as equiserve: compares the serving layers
        script = [py, "bench/peers/litserve_server.py", *batching, *model_args]
        return lambda port: loadgen.ManagedServer(
            name, [*script, "--port", str(port)], port, ready_path="/health", env=env
        )
    raise ValueError(f"unknown server {name!r}; choose from {ALL_SERVERS}, equiserve:bN or equiserve@REV")


def load_server(
    name: str,
    args: argparse.Namespace,
    templates: Sequence[loadgen.RequestTemplate],
    profile_dir: Path | None,
    raw: RawBench | None,
) -> dict[str, Any]:
    """Start one server, run every concurrency level against it, stop it.

    For equiserve, each segment is followed (server idle) by the raw pass at the segment's
    own rounded mean batch size: the ratio service/raw then compares like with like,
    measured minutes apart at most, which matters on a machine whose load changes.
    """
    server = server_factory(name, args)(loadgen.free_port())
    print(f"[{name}] starting ...", file=sys.stderr, flush=True)
    segments = []
    profile: dict[str, Any] | None = None
    with server:
        rss_idle = server.rss_kib(tree=True)
        for concurrency in args.concurrency:
            load_before = benchlib.load_average()
            cpu_before = server.cpu_s()
            print(f"[{name}] concurrency {concurrency} for {args.duration:.0f} s ...", file=sys.stderr, flush=True)
            result = asyncio.run(
                loadgen.run_closed_loop(
                    server.base_url,
                    templates,
                    concurrency=concurrency,
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    timeout_s=args.timeout,
                    id_prefix=f"{name}-c{concurrency}",
                )
            )
            summary = result.summary()
            summary["server_cpu_fraction"] = round((server.cpu_s() - cpu_before) / max(result.wall_s, 1e-9), 3)
            summary["load_average_before"] = load_before
            summary["load_average_after"] = benchlib.load_average()
            if raw is not None and name.startswith("equiserve") and summary["mean_batch_size"]:
                b = max(1, round(summary["mean_batch_size"]))
                summary["raw_paired"] = raw.paired(b, reps=args.paired_reps, budget_s=args.paired_budget_s)
            segments.append({"concurrency": concurrency, **summary})
            print(
                f"[{name}] c={concurrency}: {summary['throughput_rps']} req/s, p50 "
                f"{summary['latency']['p50_ms']} ms, statuses {summary['status_counts']}",
                file=sys.stderr,
                flush=True,
            )
        http_floor = asyncio.run(http_round_trip(server.base_url)) if name.startswith("equiserve") else None
        if profile_dir is not None and pyspy.available():
            profile = profile_segment(server, templates, max(args.concurrency), args, profile_dir)
        rss_after = server.rss_kib(tree=True)
    return {
        "server": name,
        "argv": server.argv,
        "startup_s": round(server.startup_s or 0, 1),
        "rss_idle_kib": rss_idle,
        "rss_after_kib": rss_after,
        "segments": segments,
        "http_floor": http_floor,
        "profile": profile,
    }


async def http_round_trip(base_url: str, seconds: float = 5.0, path: str = "/health/live") -> dict[str, Any]:
    """The floor of any request here: ``GET /health/live`` one at a time over a kept-alive
    connection (the same client, uvicorn, middleware and JSON answer; no body, no engine)."""
    import aiohttp

    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with session.get(base_url + path) as response:
                await response.read()
            latencies.append(time.perf_counter() - t0)
    return {"path": path, "n": len(latencies), "p50_ms": round(float(np.median(latencies)) * 1e3, 3)}


def profile_segment(
    server: loadgen.ManagedServer,
    templates: Sequence[loadgen.RequestTemplate],
    concurrency: int,
    args: argparse.Namespace,
    profile_dir: Path,
) -> dict[str, Any]:
    """An extra, unmeasured load segment with py-spy attached to the server."""
    out = profile_dir / f"profile_{server.name.replace(':', '_')}_c{concurrency}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    duration = args.profile_duration
    print(f"[{server.name}] profiling at concurrency {concurrency} for {duration:.0f} s ...", file=sys.stderr)
    spy = pyspy.start_record(server.pid, out, duration)
    asyncio.run(
        loadgen.run_closed_loop(
            server.base_url,
            templates,
            concurrency=concurrency,
            duration_s=duration,
            timeout_s=args.timeout,
            id_prefix=f"profile-{server.name}",
        )
    )
    try:
        _, err = spy.communicate(timeout=60)
    except Exception:
        spy.kill()
        return {"error": "py-spy did not finish"}
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err[-500:]}"}
    return {"file": display_path(out), "concurrency": concurrency, **pyspy.summarize(out)}


def display_path(path: Path) -> str:
    """Relative to the repository when inside it (results JSON stays machine-independent)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# -- report -------------------------------------------------------------------------------------------


def cpu_efficiency(segment: dict[str, Any]) -> float | None:
    """Requests answered per CPU-second the server (and its children) used in the segment."""
    cpu = segment.get("server_cpu_fraction")
    return segment["throughput_rps"] / cpu if cpu else None


def by_concurrency(servers: Sequence[dict[str, Any]], name: str) -> dict[int, dict[str, Any]]:
    for entry in servers:
        if entry["server"] == name:
            return {s["concurrency"]: s for s in entry["segments"]}
    return {}


def analyse(raw: dict[str, Any], servers: Sequence[dict[str, Any]], concurrencies: Sequence[int]) -> dict[str, Any]:
    """Ratios per concurrency and the four targets of issue #6.

    ``service_over_raw`` divides the service's throughput by the raw pass at its rounded
    mean batch size measured right after the segment (``raw_paired``); the sweep's value
    interpolated at the mean batch size is reported beside it.
    """
    # The first equiserve variant run ("equiserve", or "equiserve:bN") is the one compared.
    eq_name = next((e["server"] for e in servers if e["server"].startswith("equiserve")), "equiserve")
    eq = by_concurrency(servers, eq_name)
    naive = by_concurrency(servers, "naive")
    naive_ort = by_concurrency(servers, "naive-ort")
    lit = by_concurrency(servers, "litserve")
    in_process = by_concurrency(servers, "engine")
    raw_b1 = next((r for r in raw["results"] if r["batch_size"] == 1), None)
    ratios = []
    for c in concurrencies:
        seg = eq.get(c)
        row: dict[str, Any] = {"concurrency": c}
        if seg is not None:
            swept = raw_rps_at(raw, seg["mean_batch_size"]) if seg["mean_batch_size"] else None
            row["mean_batch_size"] = seg["mean_batch_size"]
            row["raw_sweep_rps_at_mean_batch"] = round(swept, 3) if swept else None
            paired = seg.get("raw_paired")
            if paired is not None:
                row["raw_paired_batch_size"] = paired["batch_size"]
                row["raw_paired_rps"] = paired["requests_per_s"]
                row["service_over_raw"] = round(seg["throughput_rps"] / paired["requests_per_s"], 3)
            if swept:
                row["service_over_raw_sweep"] = round(seg["throughput_rps"] / swept, 3)
            peers = (("naive", naive), ("naive_ort", naive_ort), ("litserve", lit), ("engine", in_process))
            for peer_name, peer in peers:
                if c in peer and peer[c]["throughput_rps"]:
                    row[f"service_over_{peer_name}"] = round(seg["throughput_rps"] / peer[c]["throughput_rps"], 3)
                    # On a shared machine a server with more runnable threads gets a bigger CPU
                    # share: requests per CPU-second of the server itself corrects for that.
                    mine, theirs = cpu_efficiency(seg), cpu_efficiency(peer[c])
                    if mine and theirs:
                        row[f"cpu_efficiency_over_{peer_name}"] = round(mine / theirs, 3)
        ratios.append(row)
    top = max(concurrencies)
    top_row = next(r for r in ratios if r["concurrency"] == top)
    targets: dict[str, Any] = {}
    if top_row.get("service_over_raw") is not None:
        targets["throughput_vs_raw_at_top_concurrency"] = {
            "concurrency": top,
            "target": ">= 0.85",
            "value": top_row["service_over_raw"],
            "met": top_row["service_over_raw"] >= 0.85,
        }
    raw_c1 = eq.get(1, {}).get("raw_paired") if 1 in eq else None
    raw_forward = raw_c1 if raw_c1 is not None and raw_c1["batch_size"] == 1 else raw_b1
    if 1 in eq and raw_forward is not None and eq[1]["latency"]["p50_ms"] is not None:
        gap = eq[1]["latency"]["p50_ms"] - raw_forward["median_ms"]
        targets["p50_c1_minus_raw_forward_ms"] = {
            "target": "<= 5",
            "value": round(gap, 2),
            "service_p50_ms": eq[1]["latency"]["p50_ms"],
            "raw_forward_ms": raw_forward["median_ms"],
            "met": gap <= 5,
        }
    if 1 in eq and eq[1].get("outside_batch_ms_p50") is not None:
        targets["p50_c1_beyond_own_forward_ms"] = {
            "target": "<= 5",
            "value": eq[1]["outside_batch_ms_p50"],
            "note": "per request: latency minus the server's inference_ms of its own batch (same request, so "
            "immune to load changes between measurements); queue_ms p50 "
            f"{eq[1]['server_queue_ms_p50']} of it is the batcher's wait",
            "met": eq[1]["outside_batch_ms_p50"] <= 5,
        }
    if "service_over_naive" in top_row:
        targets["service_over_naive_at_top_concurrency"] = {
            "concurrency": top,
            "target": ">= 3",
            "value": top_row["service_over_naive"],
            "met": top_row["service_over_naive"] >= 3,
        }
    if "service_over_litserve" in top_row:
        targets["service_over_litserve_at_top_concurrency"] = {
            "concurrency": top,
            "target": "> 1",
            "value": top_row["service_over_litserve"],
            "met": top_row["service_over_litserve"] > 1,
        }
    return {"ratios": ratios, "targets": targets}


def overhead_breakdown(stages: dict[str, Any], servers: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Where a request's time outside its own forward pass goes at concurrency 1: the stages
    timed in this process (medians), the server's queue wait, the round trip of a bodyless
    request to the same server (``http_round_trip``: client, socket, uvicorn, middleware, JSON),
    and the rest (thread hops to the preprocessing pool and the batcher, the classify route and
    its answer), which is what remains of the measured per-request median."""
    eq_name = next((e["server"] for e in servers if e["server"].startswith("equiserve")), "equiserve")
    seg = by_concurrency(servers, eq_name).get(1)
    if seg is None or seg.get("outside_batch_ms_p50") is None:
        return None
    median = stages["median_ms"]
    parts = {
        "multipart_parse_ms": median["multipart_parse"],
        "decode_ms": median["decode_served"],
        "crop_resize_ms": median["crop_resize"],
        "queue_ms": seg["server_queue_ms_p50"],
    }
    floor = next((e.get("http_floor") for e in servers if e["server"] == eq_name), None)
    parts["http_round_trip_ms"] = floor["p50_ms"] if floor else None
    known = sum(v for v in parts.values() if v is not None)
    return {
        "outside_batch_ms_p50": seg["outside_batch_ms_p50"],
        **parts,
        "rest_ms": round(seg["outside_batch_ms_p50"] - known, 2),
        "decode_pil_draft_ms": median["decode_pil_draft"],
    }


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"{m['cpu_model']}, {m['usable_cpus']} cpus, torch {m.get('torch_version')}, load average "
        f"{m['load_average_start']} -> {m['load_average_end']} | {report['timestamp']} | {report['note']}"
    )
    raw_rows = [
        [
            str(r["batch_size"]),
            benchlib.fmt(r["median_ms"]),
            benchlib.fmt(r["p10_ms"]),
            benchlib.fmt(r["p90_ms"]),
            benchlib.fmt(r["requests_per_s"], 2),
            str(r["n"]),
        ]
        for r in report["raw_ceiling"]["results"]
    ]
    benchlib.print_table(
        "1. Raw ceiling: ClassifyModel, fused B·|G| forward, no HTTP",
        ["B", "median ms", "p10 ms", "p90 ms", "req/s", "n"],
        raw_rows,
    )
    rows = []
    for entry in report["servers"]:
        for seg in entry["segments"]:
            row = loadgen.summary_row(f"{entry['server']} c={seg['concurrency']}", seg)
            cpu = seg.get("server_cpu_fraction")
            row.append(f"{cpu * 100:.0f}%" if cpu is not None else "-")
            row.append(" ".join(str(v) for v in seg["load_average_before"] or []))
            rows.append(row)
    benchlib.print_table(
        "2/3. Servers under closed-loop load (real JPEGs, multipart)",
        [*loadgen.SUMMARY_COLUMNS, "server cpu", "load avg"],
        rows,
    )
    ratio_rows = [
        [
            str(r["concurrency"]),
            benchlib.fmt(r.get("mean_batch_size"), 2),
            f"{benchlib.fmt(r.get('raw_paired_rps'), 2)} (B={r.get('raw_paired_batch_size', '-')})",
            benchlib.fmt(r.get("service_over_raw"), 2),
            benchlib.fmt(r.get("raw_sweep_rps_at_mean_batch"), 2),
            benchlib.fmt(r.get("service_over_raw_sweep"), 2),
            benchlib.fmt(r.get("service_over_naive"), 2),
            benchlib.fmt(r.get("service_over_naive_ort"), 2),
            benchlib.fmt(r.get("service_over_litserve"), 2),
            benchlib.fmt(r.get("cpu_efficiency_over_naive"), 2),
            benchlib.fmt(r.get("cpu_efficiency_over_litserve"), 2),
        ]
        for r in report["analysis"]["ratios"]
    ]
    benchlib.print_table(
        "Ratios (equiserve throughput over ...)",
        [
            "concurrency",
            "mean B",
            "raw req/s paired",
            "/raw",
            "raw sweep at mean B",
            "/sweep",
            "/naive",
            "/naive-ort",
            "/litserve",
            "per CPU-s /naive",
            "per CPU-s /litserve",
        ],
        ratio_rows,
    )
    overhead = report["analysis"].get("overhead_c1")
    if overhead:
        benchlib.print_table(
            "Concurrency 1: ms outside the request's own forward pass (p50), by stage",
            ["stage", "ms"],
            [[k.removesuffix("_ms"), benchlib.fmt(v, 2)] for k, v in overhead.items()],
        )
    target_rows = [
        [name, t["target"], str(t["value"]), "met" if t["met"] else "MISSED"]
        for name, t in report["analysis"]["targets"].items()
    ]
    benchlib.print_table("Targets (reported, not asserted)", ["target", "wanted", "measured", ""], target_rows)
    for entry in report["servers"]:
        prof = entry.get("profile")
        if prof and "categories_pct" in prof:
            benchlib.print_table(
                f"py-spy: where {entry['server']}'s busy CPU went (c={prof['concurrency']})",
                ["category", "% of samples"],
                [[k, str(v)] for k, v in prof["categories_pct"]],
            )


# -- main -----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short settings (~3 min): for a first look")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="closed-loop workers (1 8 32)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load segment (30; quick 10)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds left out of each segment (3; quick 2)")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request")
    parser.add_argument("--raw-batch-sizes", type=int, nargs="+", default=None, help="raw ceiling B (1..max)")
    parser.add_argument("--raw-rounds", type=int, default=None, help="most timed rounds of the raw ceiling")
    parser.add_argument("--raw-budget-s", type=float, default=None, help="seconds for the raw ceiling (120)")
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["equiserve", "naive", "naive-ort", "litserve"],
        help=f"any of {ALL_SERVERS}, or equiserve:bN (max batch N)",
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="equiserve and LitServe")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="equiserve and LitServe batch wait")
    parser.add_argument("--equiserve-args", nargs="*", default=[], help="more `python -m app serve` flags")
    parser.add_argument("--threads", type=int, default=None, help="torch threads everywhere (default: torch's)")
    parser.add_argument("--model", default=MODEL, help="model served by every server")
    parser.add_argument(
        "--runtime",
        choices=("auto", "torch", "onnxruntime"),
        default="auto",
        help="backbone runtime of equiserve, the raw ceiling and LitServe (naive: torch; naive-ort: onnxruntime)",
    )
    parser.add_argument("--models-dir", type=Path, default=None, help="model repository (default: models/)")
    parser.add_argument("--photos", type=int, default=None, help="use only the first N photos")
    parser.add_argument("--profile", action="store_true", help="py-spy profile of each server at top concurrency")
    parser.add_argument("--profile-duration", type=float, default=20.0)
    parser.add_argument("--paired-reps", type=int, default=5, help="raw calls after each equiserve segment")
    parser.add_argument("--paired-budget-s", type=float, default=20.0, help="seconds for those calls (>= 1 call)")
    parser.add_argument("--stage-reps", type=int, default=None, help="rounds of the stage timings (20; quick 5)")
    parser.add_argument("--skip-raw", action="store_true", help="no raw ceiling (ratios to raw are then missing)")
    benchlib.add_report_args(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    quick = args.quick
    args.concurrency = args.concurrency or [1, 8, 32]
    args.duration = args.duration if args.duration is not None else (10.0 if quick else 30.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if quick else 3.0)
    args.warmup = min(args.warmup, args.duration / 3)  # most of each segment is measured
    default_raw = [1, 2, 4, 8] if quick else [b for b in (1, 2, 4, 8, 16, 32) if b <= args.max_batch_size]
    args.raw_batch_sizes = args.raw_batch_sizes or default_raw
    args.raw_rounds = args.raw_rounds or (3 if quick else 8)
    args.stage_reps = args.stage_reps or (5 if quick else 20)
    args.raw_budget_s = args.raw_budget_s if args.raw_budget_s is not None else (30.0 if quick else 120.0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = benchlib.utc_now()
    load_start = benchlib.load_average()
    photos = loadgen.load_photos()[: args.photos]
    templates = loadgen.photo_templates(photos, args.model, METHOD)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    raw: dict[str, Any] = {"info": {}, "results": []}
    bench = None
    if not args.skip_raw:
        print(f"raw ceiling at B={args.raw_batch_sizes} (up to ~{args.raw_budget_s:.0f} s) ...", file=sys.stderr)
        bench = RawBench(photos, args.model, args.models_dir, args.runtime)
        raw = bench.sweep(args.raw_batch_sizes, rounds=args.raw_rounds, budget_s=args.raw_budget_s)
    input_size = bench.loaded.backbone.input_size if bench is not None else 224
    print(f"stages outside the forward pass ({args.stage_reps} rounds) ...", file=sys.stderr)
    stages = stage_costs(templates, input_size, args.stage_reps)
    profile_dir = args.out.parent / "profiles" if args.profile else None
    servers = [
        load_engine(args, photos) if name == "engine" else load_server(name, args, templates, profile_dir, bench)
        for name in args.servers
    ]

    report = benchlib.report_header("bench_service", started, args.note, load_start)
    report["config"] = {
        "model": args.model,
        "method": METHOD,
        "photos": [{"name": p.name, "bytes": len(p.data), "size": [p.width, p.height]} for p in photos],
        "request": "multipart/form-data, one JPEG per request, method=equitune, top_k=3",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "equiserve_args": args.equiserve_args,
        "runtime": args.runtime,
        "threads": args.threads,
        "raw_batch_sizes": args.raw_batch_sizes,
        "quick": args.quick,
    }
    report["raw_ceiling"] = raw
    report["servers"] = servers
    report["stages"] = stages
    report["analysis"] = analyse(raw, servers, args.concurrency)
    report["analysis"]["overhead_c1"] = overhead_breakdown(stages, servers)
    benchlib.write_json(args.out, report)
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

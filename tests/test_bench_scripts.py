"""Each bench/ script, run end to end with the tiniest settings, so that none of them rots.

They start real `python -m app serve` subprocesses (a tiny random-init model where the
script allows it), hence ``slow``. Speed is never asserted; only that the run completes,
writes its JSON, and the reliability invariants hold (every request answered once).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.imagetools import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

import bench_quant  # noqa: E402


def run_script(script: str, *args: str, timeout: float = 300) -> None:
    completed = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    write_tiny_model(models)
    return models


def test_bench_service_smoke(tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "service.json"
    run_script(
        "bench_service.py",
        "--model",
        "tiny",
        "--models-dir",
        str(tiny_dir),
        "--servers",
        "equiserve",
        "engine",
        "naive",
        "naive-ort",
        "litserve",
        "--concurrency",
        "1",
        "2",
        "--duration",
        "0.8",
        "--warmup",
        "0.2",
        "--raw-batch-sizes",
        "1",
        "2",
        "--raw-rounds",
        "2",
        "--raw-budget-s",
        "2",
        "--paired-reps",
        "2",
        "--max-batch-size",
        "2",
        "--photos",
        "2",
        "--out",
        str(out),
    )
    report = read(out)
    assert [s["server"] for s in report["servers"]] == ["equiserve", "engine", "naive", "naive-ort", "litserve"]
    assert report["raw_ceiling"]["info"]["runtime"] == "onnxruntime"  # the default, as served
    assert "--runtime" in report["servers"][0]["argv"] and "onnxruntime" in report["servers"][3]["argv"]
    assert all(r.get("service_over_engine") for r in report["analysis"]["ratios"])  # HTTP vs in process
    for server in report["servers"]:
        for segment in server["segments"]:
            assert segment["transport_errors"] == 0 and segment["ok"] > 0
    assert {r["batch_size"] for r in report["raw_ceiling"]["results"]} == {1, 2}
    assert "p50_c1_minus_raw_forward_ms" in report["analysis"]["targets"]
    assert report["machine"]["load_average_start"] is not None


def test_bench_fused_smoke(tmp_path: Path) -> None:
    out = tmp_path / "fused.json"
    run_script("bench_fused.py", "--batch-sizes", "1", "--repeats", "1", "--min-repeats", "1", "--budget-s", "1",
               "--out", str(out))  # fmt: skip
    report = read(out)
    assert report["config"]["runtime"] == "onnxruntime"
    (entry,) = report["results"]
    assert entry["batch_size"] == 1 and entry["max_abs_diff_fused_vs_loop"] < 1e-3


def test_bench_overload_smoke(tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "overload.json"
    run_script(
        "bench_overload.py",
        "--model",
        "tiny",
        "--models-dir",
        str(tiny_dir),
        "--calibrate-s",
        "1.5",
        "--calibrate-concurrency",
        "2",
        "--duration",
        "2",
        "--factor",
        "10",
        "--settle-s",
        "1",
        "--probe-s",
        "0.5",
        "--photos",
        "2",
        "--server-args",
        "--max-batch-size 2 --queue-size 2",
        "--out",
        str(out),
    )
    report = read(out)
    tally = report["tally"]
    assert tally["exactly_one_answer_each"] and tally["server_total_equals_sent"]
    assert tally["sent"] == tally["status_200"] + tally["status_429"] + sum(tally["other_statuses"].values())
    assert report["rss_mib"]["baseline"] is not None
    server_side = report["overload"]["server_side_latency_by_status"]  # from the access log: one line each
    assert server_side["200"]["n"] == tally["status_200"]
    assert server_side.get("429", {"n": 0})["n"] == tally["status_429"]


def test_bench_soak_smoke(tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "soak.json"
    run_script(
        "bench_soak.py",
        "--model",
        "tiny",
        "--models-dir",
        str(tiny_dir),
        "--minutes",
        "0.05",
        "--concurrency",
        "2",
        "--out",
        str(out),
    )
    report = read(out)
    assert all(row["expected"] for row in report["preflight"].values()), report["preflight"]
    assert report["summary"]["transport_errors"] == 0 and not report["summary"]["unexpected"]


def test_bench_gpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    run_script(
        "bench_gpu.py",
        "--smoke",
        "--models",
        "clip-vit-b32-c4",
        "--concurrency",
        "1",
        "--duration",
        "1",
        "--out",
        str(out),
    )
    report = read(out)
    assert report["smoke"] and report["card"] == "cpu-smoke"
    load = report["models"]["clip-vit-b32-c4"]["load"]
    assert load and all(seg["ok"] > 0 and seg["transport_errors"] == 0 for seg in load)
    assert [seg["variant"] for seg in load] == ["before", "after"]  # the host pipeline, then the device one


def test_bench_memory_smoke(tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "memory.json"
    run_script("bench_memory.py", "--sets", "tiny", "--models-dir", str(tiny_dir), "--duration", "1",
               "--settle-s", "0.5", "--concurrency", "1", "--out", str(out))  # fmt: skip
    report = read(out)
    (entry,) = report["sets"]
    assert entry["models"] == "tiny" and entry["probe"]["after_engine_start_mib"] > entry["probe"]["python_mib"]
    assert "open_clip" not in entry["probe"]["imported"]  # a torchvision model pulls no CLIP code in
    server = entry["server"]
    assert server["idle_rss_mib"] > 0 and server["hwm_mib"] >= server["peak_rss_under_load_mib"] > 0
    assert server["load"]["status_counts"].get("200", 0) > 0
    assert out.with_suffix(".md").read_text().startswith("# Memory")


def quant_report(agreement: float, drops: dict[str, float] | None) -> dict[str, Any]:
    """The parts of a bench_quant report that its decision reads."""
    report: dict[str, Any] = {"agreement": {"imagenet": {"top1_agreement": agreement}}}
    if drops is not None:
        report["transfer"] = {name: {"drop_points": {"equitune": {"rotated": drop}}} for name, drop in drops.items()}
    return report


def test_bench_quant_decision_rule() -> None:
    """int8 becomes the CPU default only with every agreement >= 99 % and every drop <= 0.5
    points; without the transfer table (--skip-transfer) the drop is unknown, so: no."""
    names = bench_quant.FASHION
    assert bench_quant.decide(quant_report(0.995, dict.fromkeys(names, 0.4)))["int8_cpu_default"]
    assert not bench_quant.decide(quant_report(0.985, dict.fromkeys(names, 0.4)))["int8_cpu_default"]
    worse = bench_quant.decide(quant_report(0.995, {names[0]: 0.4, names[1]: 0.6}))
    assert not worse["int8_cpu_default"]
    assert worse["worst_drop_at"] == f"{names[1]}/equitune/rotated"
    unmeasured = bench_quant.decide(quant_report(0.995, None))
    assert not unmeasured["int8_cpu_default"] and unmeasured["worst_accuracy_drop_points"] is None


def test_bench_startup_smoke(tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "startup.json"
    run_script("bench_startup.py", "--models", "tiny", "--models-dir", str(tiny_dir), "--warm-runs", "1",
               "--out", str(out))  # fmt: skip
    runs = read(out)["runs"]
    assert [run["start"].split()[0] for run in runs] == ["first", "warm"]
    for run in runs:
        assert 0 < run["listening_s"] <= run["ready_s"] and set(run["model_load_s"]) == {"tiny"}
    assert out.with_suffix(".md").read_text().startswith("# Start-up")


def test_bench_grpc_smoke(tmp_path: Path) -> None:
    out = tmp_path / "grpc.json"
    run_script("bench_grpc.py", "--concurrency", "1", "2", "--duration", "0.5", "--rounds", "1", "--out", str(out))
    report = read(out)
    assert [row["concurrency"] for row in report["summary"]] == [1, 2]
    for row in report["summary"]:
        for protocol in ("rest", "grpc"):
            assert row[protocol]["errors"] == 0 and row[protocol]["throughput_rps"] > 0, row
    assert out.with_suffix(".md").read_text().count("| grpc |") == 2

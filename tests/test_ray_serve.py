"""Ray Serve (app/ray_serve.py): `python -m app serve --ray` on a local cluster of 2 replicas.

One scenario on one cluster, since starting Ray is the slow part: requests spread over both
replicas (X-Replica); a real Prometheus sees every replica's equiserve_* metrics labelled by
replica next to Ray Serve's own, and every dashboard panel has data; a client's traceparent
reaches a replica through Ray's proxy and the replica exports that trace over OTLP
(tests/test_tracing_wire.py's receiver); a replica killed under
load is replaced while every request gets exactly one answer (those in flight on it are sent
again by the proxy middleware); SIGTERM drains.

Ray keeps its traffic on loopback only inside a network namespace with just `lo` up, so the
scenario runs through `unshare --net` in a subprocess (root, as here and in CI) and reports
a JSON tally that the test checks again. The proxy middleware's own cases run in process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.types import Message, Receive, Scope, Send

from app.config import Settings
from app.ray_serve import NODE_TARGETS, REPLICA_TARGETS, ProxyAnswers, deployment_options, replica_settings
from tests.apptools import ROOT, ServerProcess, free_port, start_server, wait_ready
from tests.imagetools import png_bytes, write_tiny_model

BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402

MAX_BODY = 200_000
# what a client sees of a server that has closed its port (a connection of Ray's proxy ends)
CLOSED = {"ClientConnectorError", "ClientOSError", "ServerDisconnectedError", "ClientPayloadError"}


# -- in process: deployment options and the proxy middleware ------------------------------------


def test_deployment_options_fixed_and_autoscaling() -> None:
    fixed = deployment_options(Settings(replicas=3, replica_cpus=0.5, max_ongoing_requests=16, drain_timeout_s=7))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5}
    assert fixed["max_ongoing_requests"] == 16 and fixed["graceful_shutdown_timeout_s"] == 7
    scaled = deployment_options(Settings(replicas=5, min_replicas=2, max_replicas=4, target_ongoing_requests=8))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 2, "max_replicas": 4, "initial_replicas": 4, "target_ongoing_requests": 8.0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="min_replicas"):
        deployment_options(Settings(min_replicas=3, max_replicas=2))


def test_the_opentelemetry_configuration_goes_with_each_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers on the nodes of a joined cluster do not inherit the driver's environment: the OTEL_*
    variables travel in the replicas' runtime_env (tests/test_tracing_wire.py runs a replica)."""
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    assert "runtime_env" not in deployment_options(Settings())["ray_actor_options"]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "s")
    assert deployment_options(Settings())["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SERVICE_NAME": "s"}
    }


def test_replica_settings_threads_and_nice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica's compute threads: one per reserved CPU and the process's own priority,
    unless set, by argument or by EQUISERVE_* variable (Ray starts every actor of a node in
    one scheduling group, where nice +10 would yield to every other busy actor)."""
    monkeypatch.delenv("EQUISERVE_COMPUTE_NICE", raising=False)
    monkeypatch.delenv("EQUISERVE_TORCH_THREADS", raising=False)
    default = replica_settings(Settings(replica_cpus=1.5))
    assert default.torch_threads == 2 and default.compute_nice == 0
    assert Settings().compute_nice == 10  # a server of its own keeps its default
    chosen = replica_settings(Settings(replica_cpus=1.5, torch_threads=1, compute_nice=10))
    assert chosen.torch_threads == 1 and chosen.compute_nice == 10
    monkeypatch.setenv("EQUISERVE_COMPUTE_NICE", "5")
    assert replica_settings(Settings()).compute_nice == 5


def scripted_proxy(answers: list[tuple[int, list[tuple[bytes, bytes]]] | None], seen: list[bytes]) -> Any:
    """A stand-in for Ray's proxy app: reads the whole body, then answers the next scripted
    (status, headers), or nothing at all (None: its replica died)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(body)
        answer = answers.pop(0)
        if answer is not None:
            await send({"type": "http.response.start", "status": answer[0], "headers": answer[1]})
            await send({"type": "http.response.body", "body": b"answer"})

    return app


async def through_proxy_answers(answers: list[Any]) -> tuple[list[Message], list[bytes]]:
    seen: list[bytes] = []
    middleware = ProxyAnswers(scripted_proxy(answers, seen))
    chunks = [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"cd"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return chunks.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/models/m/classify", "headers": [(b"x-request-id", b"r1")]}
    await middleware(scope, receive, send)
    return sent, seen


async def test_a_request_whose_replica_died_is_sent_again_with_its_body() -> None:
    sent, seen = await through_proxy_answers([None, (200, [(b"x-replica", b"b")])])
    assert seen == [b"abcd", b"abcd"]
    assert sent[0]["status"] == 200 and (b"x-retried", b"1") in sent[0]["headers"]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_a_second_loss_is_a_503_with_retry_after() -> None:
    sent, seen = await through_proxy_answers([None, None])
    assert len(seen) == 2 and sent[0]["status"] == 503
    assert (b"retry-after", b"1") in sent[0]["headers"]
    error = json.loads(sent[1]["body"])["error"]
    assert error == {"code": "replica_unavailable", "message": error["message"], "request_id": "r1"}


async def test_the_proxys_own_404_is_not_ready_but_the_apps_404_passes() -> None:
    sent, _ = await through_proxy_answers([(404, [])])
    assert sent[0]["status"] == 503 and json.loads(sent[1]["body"])["error"]["code"] == "not_ready"
    sent, seen = await through_proxy_answers([(404, [(b"x-replica", b"a")])])
    assert sent[0]["status"] == 404 and len(seen) == 1 and sent[1]["body"] == b"answer"


# -- on a local Ray cluster, in a network namespace ----------------------------------------------


@pytest.mark.slow
def test_ray_serve_replicas_metrics_faults_and_drain(tmp_path: Path) -> None:
    command = f"ip link set lo up && exec {sys.executable} -m tests.test_ray_serve {tmp_path}"
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=480
    )
    assert proc.returncode == 0, f"{proc.stdout[-8000:]}\n{proc.stderr[-8000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report, indent=1))
    from tests.test_tracing_wire import assert_the_clients_trace_continues

    assert len(report["replicas"]) == 2
    assert_the_clients_trace_continues(report["trace"])
    assert set(report["prometheus_replicas"]) == set(report["replicas"])
    assert set(report["ray_serve_replicas"]) >= set(report["replicas"])
    assert report["empty_panels"] == []
    fault = report["fault"]
    assert fault["transport_errors"] == 0 and fault["unique_ids"] == fault["sent"] > 50
    assert set(fault["status_counts"]) <= {"200", "503"} and fault["retried"] >= 1
    assert fault["echoed_ids"] == fault["status_counts"].get("200")
    assert report["replacement"] not in report["replicas"]
    drain = report["drain"]
    assert drain["before_sigterm"] == {"200": drain["answered_before_sigterm"]} and drain["answered_before_sigterm"] > 0
    assert drain["exit_code"] == 0


def replica_pids(driver: int) -> list[int]:
    pids = []
    for pid in loadgen.descendants(driver):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ServeReplica:equiserve"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def replicas_answering(base: str, image: bytes, n: int = 24) -> set[str]:
    def one(i: int) -> str:
        files = [("image", ("a.png", image, "image/png"))]
        request_id = f"spread-{time.monotonic_ns()}-{i}"
        r = httpx.post(f"{base}/v1/models/tiny/classify", files=files, headers={"x-request-id": request_id}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers.get_list("x-request-id") == [request_id]  # once, although Ray's proxy adds it too
        return r.headers["x-replica"]

    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(one, range(n)))


def wait_for(condition: Any, timeout_s: float, what: str, process: ServerProcess) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert process.poll() is None, process.output()[-6000:]
        time.sleep(1)
    raise AssertionError(f"{what} after {timeout_s:.0f} s\n{process.output()[-6000:]}")


def load_with(base: str, templates: list[Any], seconds: float, at_s: float, action: Any) -> Any:
    """A closed loop at concurrency 8 that calls ``action()`` once, ``at_s`` into the run."""
    done: dict[str, float] = {}

    def tick(elapsed: float) -> None:
        if elapsed >= at_s and not done:
            action()
            done["at"] = elapsed

    result = asyncio.run(
        loadgen.run_closed_loop(base, templates, concurrency=8, duration_s=seconds, timeout_s=30, on_tick=tick)
    )
    return result, done["at"]


def scenario(workdir: Path) -> dict[str, Any]:
    """The cluster scenario (inside the namespace); asserts as it goes, returns the tally."""
    from tests.test_prometheus import drive_dashboard_traffic, empty_panels, running_prometheus
    from tests.test_tracing_wire import start_receiver, trace_through

    models, file_sd = workdir / "models", workdir / "file_sd"
    # At 128 px a replica computes most of the time (the pass at 32 px is short beside the trip
    # through Ray's proxy), so the replica killed under load has accepted requests to send again.
    write_tiny_model(models, input_size=128)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    receiver = start_receiver()  # the replicas export their traces to it (OTEL_* in their runtime_env)
    process = start_server(
        models, port, "--ray", "--replicas", "2", "--max-batch-size", "8", "--drain-timeout-s", "20",
        "--ray-metrics-dir", str(file_sd), "--max-body-bytes", str(MAX_BODY),
    )  # fmt: skip
    report: dict[str, Any] = {"seconds": {}}
    started = time.monotonic()

    def phase(name: str) -> None:
        report["seconds"][name] = round(time.monotonic() - started, 1)

    try:
        wait_ready(base, process, timeout=300)
        phase("ready")
        image = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))

        def two_replicas() -> set[str] | None:
            answering = replicas_answering(base, image)
            return answering if len(answering) == 2 else None

        replicas = wait_for(two_replicas, 60, "not both replicas answer", process)
        report["replicas"] = sorted(replicas)
        report["trace"] = trace_through(base, receiver)

        # Metrics: the compose job's static target is the single server's; under Ray the
        # replicas come from file_sd, so it points at a closed port here (no double count).
        wait_for(lambda: (file_sd / REPLICA_TARGETS).is_file(), 30, "no file_sd targets", process)
        with running_prometheus(f"127.0.0.1:{free_port()}", file_sd) as prometheus:
            drive_dashboard_traffic(base, "tiny", 11, MAX_BODY)
            report["empty_panels"] = empty_panels(prometheus, timeout_s=25)
            per_replica = prometheus.query("count by (replica) (equiserve_model_info)")
            report["prometheus_replicas"] = sorted(s["metric"]["replica"] for s in per_replica)
            ray_own = prometheus.query('count by (replica) ({__name__=~"ray_serve_.+", application="equiserve"})')
            report["ray_serve_replicas"] = sorted(s["metric"].get("replica", "") for s in ray_own)
            assert json.loads((file_sd / NODE_TARGETS).read_text()), "no Ray node target"

        phase("prometheus")
        # A replica killed under load: every request answered once, none hangs.
        photo = loadgen.Photo("noise", image, "image/png", 32, 32)
        templates = loadgen.photo_templates([photo], "tiny")
        victim = replica_pids(process.pid)[0]
        result, _ = load_with(base, templates, 8, 2, lambda: os.kill(victim, signal.SIGKILL))
        summary = result.summary()
        ids = [r.request_id for r in result.records]
        report["fault"] = {
            "sent": len(ids), "unique_ids": len(set(ids)), "status_counts": summary["status_counts"],
            "transport_errors": summary["transport_errors"],
            "echoed_ids": sum(r.echoed_id == r.request_id for r in result.records if r.status == 200),
        }  # fmt: skip
        # Ray starts a replacement; the targets follow.
        fresh = wait_for(lambda: (two_replicas() or replicas) - replicas, 150, "no replacement replica", process)
        report["replacement"] = fresh.pop()
        phase("replaced")
        report["fault"]["retried"] = process.output().count("stopped before answering; sending it again")

        def listed() -> list[str]:
            return sorted(g["labels"]["replica"] for g in json.loads((file_sd / REPLICA_TARGETS).read_text()))

        alive = sorted(replicas_answering(base, image))
        wait_for(lambda: listed() == alive, 30, f"targets {listed()} != live replicas {alive}", process)

        # SIGTERM under load: what was answered before it is a 200; a request in flight at the
        # signal gets one HTTP answer, a 200 if a replica had accepted it (the driver's own tally of
        # accepted requests, checked below) or a 503 if it arrived after the drain began (the client
        # cannot tell which: its send time is not the replica's arrival time); later requests get
        # 503, or once Ray has stopped, a closed port; none hangs; the driver exits 0.
        result, sigterm_at = load_with(base, templates, 4, 1.5, lambda: process.send_signal(signal.SIGTERM))
        before = Counter(str(r.status) for r in result.records if r.end < sigterm_at)
        in_flight = Counter(
            str(r.status) if r.status else r.error for r in result.records if r.start < sigterm_at <= r.end
        )
        after = Counter(str(r.status) if r.status else r.error for r in result.records if r.start >= sigterm_at)
        assert set(in_flight) <= {"200", "503"}, in_flight
        assert set(after) <= {"200", "503", *CLOSED}, after
        report["drain"] = {
            "answered_before_sigterm": sum(before.values()), "before_sigterm": dict(before),
            "in_flight_at_sigterm": dict(in_flight), "after_sigterm": dict(after), "exit_code": process.wait(90),
        }  # fmt: skip
        phase("stopped")
        output = process.output()
        assert "stopped: every replica drained" in output and "every accepted request was answered" in output
    finally:
        process.kill_all()  # the driver and the Ray cluster it started, if a check above failed
        print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    (folder / "report.json").write_text(json.dumps(scenario(folder)))

"""A real Prometheus (Debian's `prometheus`, 2.42) scrapes a real server with the repository's
docker/prometheus/prometheus.yml (its targets templated to the test's ports, nothing else
changed), and every PromQL query of the Grafana dashboard returns series.

tests/test_ray_serve.py reuses these helpers for the Ray Serve replicas (file_sd targets).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.apptools import free_port, start_server, wait_ready
from tests.imagetools import png_bytes
from tests.test_deploy_configs import _VARIABLE, DASHBOARD, PROMETHEUS_YML, expressions

pytestmark = pytest.mark.slow

COMPOSE_TARGET = "equiserve:8000"
SELF_TARGET = "localhost:9090"
FILE_SD_DIR = "/etc/prometheus/file_sd"
METHODS = ("vanilla", "equitune", "equizero", "lambda")


def prometheus_config(target: str, prometheus_port: int, file_sd_dir: Path) -> str:
    """The compose file, pointed at this test's server, Prometheus and file_sd folder."""
    text = PROMETHEUS_YML.read_text()
    for old in (COMPOSE_TARGET, SELF_TARGET, FILE_SD_DIR):
        assert old in text, f"{PROMETHEUS_YML} no longer names {old}"
    text = text.replace(COMPOSE_TARGET, target).replace(SELF_TARGET, f"127.0.0.1:{prometheus_port}")
    return text.replace(FILE_SD_DIR, str(file_sd_dir))


class Prometheus:
    """``prometheus`` on a free loopback port, in a temporary folder, with ``query``."""

    def __init__(self, target: str, file_sd_dir: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = self.folder / "prometheus.yml"
        config.write_text(prometheus_config(target, self.port, file_sd_dir))
        self.log = (self.folder / "prometheus.log").open("w")
        binary = shutil.which("prometheus")
        assert binary, "Debian's prometheus package is needed (scripts/install --test installs it)"
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.folder / "prometheus.log").read_text(errors="replace")

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def targets(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def running_prometheus(target: str, file_sd_dir: Path) -> Iterator[Prometheus]:
    prometheus = Prometheus(target, file_sd_dir)
    try:
        yield prometheus
    finally:
        prometheus.stop()


def dashboard_queries() -> list[str]:
    """Every panel's PromQL, with Grafana's variables as Grafana fills them for "All"."""
    queries = []
    for expr in expressions(json.loads(DASHBOARD.read_text())):
        concrete = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        queries.append(_VARIABLE.sub(".*", concrete))
    assert queries
    return queries


def drive_dashboard_traffic(base: str, model: str, seconds: float, max_body_bytes: int) -> dict[str, int]:
    """What makes every panel have data: every method (equizero picks copies, λ has an entropy)
    and a body over the limit (a rejection). Returns the status tally."""
    image = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    url = f"{base}/v1/models/{model}/classify"
    tally: dict[str, int] = {}
    with httpx.Client(timeout=30) as client:
        too_large = client.post(url, content=b"x" * (max_body_bytes + 1), headers={"content-type": "image/png"})
        assert too_large.status_code == 413, too_large.text
        tally["413"] = 1
    deadline = time.monotonic() + seconds

    def loop(worker: int) -> list[int]:
        statuses = []
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                method = METHODS[len(statuses) % len(METHODS)]
                files = [("image", ("a.png", image, "image/png"))]
                statuses.append(client.post(url, files=files, data={"method": method}).status_code)
        return statuses

    with ThreadPoolExecutor(4) as pool:
        for statuses in pool.map(loop, range(4)):
            for status in statuses:
                tally[str(status)] = tally.get(str(status), 0) + 1
    assert set(tally) == {"200", "413"}, tally
    return tally


def empty_panels(prometheus: Prometheus, timeout_s: float) -> list[str]:
    """The dashboard queries still without series after ``timeout_s`` (polled)."""
    deadline = time.monotonic() + timeout_s
    while True:
        empty = [q for q in dashboard_queries() if not prometheus.query(q)]
        if not empty or time.monotonic() > deadline:
            return empty
        time.sleep(1)


def test_prometheus_scrapes_the_server_and_every_panel_has_data(tiny_models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    max_body = 200_000
    process = start_server(tiny_models_dir, port, "--max-batch-size", "8", "--max-body-bytes", str(max_body))
    try:
        wait_ready(base, process)
        file_sd = tmp_path / "file_sd"  # what compose mounts at /etc/prometheus/file_sd, empty without Ray
        file_sd.mkdir()
        with running_prometheus(f"127.0.0.1:{port}", file_sd) as prometheus:
            # Two scrapes (5 s apart) inside the traffic: every rate() has two samples.
            drive_dashboard_traffic(base, "tiny", 11, max_body)
            empty = empty_panels(prometheus, timeout_s=20)
            assert not empty, f"no series for {empty}\n{prometheus.output()[-3000:]}"
            up = prometheus.query('up{job="equiserve"}')
            assert [float(s["value"][1]) for s in up] == [1.0]
            # the Ray jobs' file_sd globs match nothing: no targets, and no error either
            jobs = {t["labels"]["job"] for t in prometheus.targets()}
            assert jobs == {"equiserve", "prometheus"}, jobs
            assert "level=error" not in prometheus.output(), prometheus.output()
            requests = prometheus.query('sum(equiserve_requests_total{status="200"})')
            assert float(requests[0]["value"][1]) > 10
    finally:
        process.terminate()
        process.wait(30)

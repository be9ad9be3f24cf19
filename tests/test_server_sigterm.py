"""The real server process: SIGTERM drains (ready 503, new requests 503, accepted ones answered,
exit code 0); a broken model repository fails start-up with a clear error and exit code != 0;
--processes: several servers on one port, drained together, stopped together."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.apptools import ServerProcess, free_port, start_server, wait_ready
from tests.imagetools import png_bytes

pytestmark = pytest.mark.slow


def test_sigterm_drains_accepted_requests_and_exits_zero(tiny_models_dir: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # A long batch timer keeps accepted requests queued while we look at the draining server;
    # a batch waits only while another request is on its way, so one uploads its body slowly.
    with start_server(tiny_models_dir, port, "--max-wait-ms", "2500", "--max-batch-size", "64") as process:
        wait_ready(base, process)
        image = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))

        def classify() -> int:
            files = [("image", ("a.png", image, "image/png"))]
            return httpx.post(f"{base}/v1/models/tiny/classify", files=files, timeout=30).status_code

        def slow_upload() -> int:
            boundary = "slow-upload"
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()

            def body() -> Iterator[bytes]:
                yield head
                time.sleep(2.0)
                yield image + f"\r\n--{boundary}--\r\n".encode()

            headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
            url = f"{base}/v1/models/tiny/classify"
            return httpx.post(url, content=body(), headers=headers, timeout=30).status_code

        with ThreadPoolExecutor(9) as pool:
            slow = pool.submit(slow_upload)
            time.sleep(0.3)
            accepted = [pool.submit(classify) for _ in range(8)]
            time.sleep(0.7)  # all eight are queued, waiting for the slow upload (<= the 2.5 s timer)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            ready = httpx.get(f"{base}/health/ready", timeout=5)
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            late = httpx.post(f"{base}/v1/models/tiny/classify", files=[("image", ("a.png", image, "image/png"))])
            assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
            assert [f.result() for f in accepted] == [200] * 8
            # Its body was still arriving at SIGTERM, but it had been accepted: it is answered.
            assert slow.result() == 200
        while "stopped: every accepted request was answered" not in process.output():
            assert process.poll() is None or "stopped" in process.output(), process.output()
            time.sleep(0.05)
        stopped = time.monotonic()
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - stopped < 1.5, "the process lingers after its shutdown is complete"


def test_corrupt_weights_fail_start_up_naming_the_file(tiny_models_dir: Path) -> None:
    (tiny_models_dir / "tiny" / "lambda_net.safetensors").write_bytes(b"not a safetensors file")
    with start_server(tiny_models_dir, free_port()) as process:
        code = process.wait(timeout=120)
        output = process.output()
    assert code != 0
    assert "lambda_net.safetensors" in output


def running(pid: int) -> bool:
    """Alive, not a zombie waiting to be reaped."""
    import psutil

    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` on a new connection, as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", headers={"connection": "close"}, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _children(process: ServerProcess, count: int) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"serving with (\d+) processes on \S+: pids \[([\d, ]+)\]", process.output())
        if m:
            pids = [int(p) for p in m[2].split(",")]
            assert int(m[1]) == len(pids) == count
            return pids
        time.sleep(0.1)
    raise AssertionError(process.output())


def test_processes_share_the_port_and_drain_together(tiny_models_dir: Path) -> None:
    import psutil

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with start_server(tiny_models_dir, port, "--processes", "2") as process:
        pids = _children(process, 2)
        wait_ready(base, process)

        def listening_ports(pid: int) -> list[int]:
            child = psutil.Process(pid)
            connections = getattr(child, "net_connections", child.connections)  # renamed in psutil 6
            return [c.laddr.port for c in connections("tcp") if c.status == psutil.CONN_LISTEN]

        # Each child listens on the port itself (SO_REUSEPORT), no proxy in between; the first one
        # ready made the port answer, the other may still be loading its models.
        deadline = time.monotonic() + 60
        while any(listening_ports(pid) != [port] for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [listening_ports(pid) for pid in pids] == [[port], [port]]
        image = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        for _ in range(20):  # a new connection each time: the kernel spreads them; every one is answered
            r = httpx.post(f"{base}/v1/models/tiny/classify", files=[("image", ("a.png", image, "image/png"))])
            assert r.status_code == 200
        # One replica to Prometheus: whichever process answers the scrape reports all 20.
        for _ in range(6):
            samples = scrape(base)
            assert samples[("equiserve_requests_total", (("endpoint", "classify"), ("model", "tiny"),
                                                          ("status", "200")))] == 20  # fmt: skip
            assert samples[("equiserve_batch_size_count", (("model", "tiny"),))] == 20
            assert samples[("equiserve_inflight_requests", ())] == 0
            info = [value for (name, _), value in samples.items() if name == "equiserve_model_info"]
            assert info == [1.0]  # one series per model, not one per process
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, process.output()
        assert process.output().count("stopped: every accepted request was answered") == 2
        assert not any(running(pid) for pid in pids)


def test_a_dead_process_stops_the_replica(tiny_models_dir: Path) -> None:
    import psutil

    port = free_port()
    with start_server(tiny_models_dir, port, "--processes", "2") as process:
        first, second = _children(process, 2)
        wait_ready(f"http://127.0.0.1:{port}", process)
        psutil.Process(first).kill()
        # the other one is stopped (drained) and the replica exits non-zero, for the orchestrator to restart
        assert process.wait(timeout=60) != 0
        assert not running(second)


def test_killing_the_supervisor_stops_its_processes(tiny_models_dir: Path) -> None:
    import psutil

    port = free_port()
    with start_server(tiny_models_dir, port, "--processes", "2") as process:
        pids = _children(process, 2)
        wait_ready(f"http://127.0.0.1:{port}", process)
        process.kill()  # SIGKILL: no chance to forward anything
        process.wait()
        gone = psutil.wait_procs([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=60)[1]
        assert not gone, f"still running after the supervisor died: {gone}"


def test_the_server_listens_while_its_models_load(tiny_models_dir: Path) -> None:
    """live 200 and ready 503 with the progress from the start (a Kubernetes probe never meets a
    closed port); inference 503 until ready. A model.yaml that is a named pipe holds the loading
    until the test writes it, so every state is seen for certain."""
    import os
    import threading

    slow = tiny_models_dir / "slow"
    slow.mkdir()
    for name in ("trunk.safetensors", "head.safetensors", "lambda_net.safetensors"):
        (slow / name).symlink_to(tiny_models_dir / "tiny" / name)
    os.mkfifo(slow / "model.yaml")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with start_server(tiny_models_dir, port, "--models", "tiny,slow") as process:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.output()
            try:
                ready = httpx.get(f"{base}/health/ready", timeout=2)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if ready.json().get("loaded") == ["tiny"]:
                break
            time.sleep(0.1)
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "loading", "ready": False, "loaded": ["tiny"], "pending": ["slow"], "loading": "slow",
            "estimated_remaining_s": None,  # "slow" never loaded before: no time to go by
        }  # fmt: skip
        assert httpx.get(f"{base}/health/live").status_code == 200
        assert httpx.head(f"{base}/health/live").status_code == 200
        assert httpx.head(f"{base}/health/ready").status_code == 503
        assert httpx.get(f"{base}/v2/health/ready").status_code == 503
        image = png_bytes(np.zeros((8, 8, 3), np.uint8))
        r = httpx.post(f"{base}/v1/models/tiny/classify", files=[("image", ("a.png", image, "image/png"))])
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        writer = threading.Thread(
            target=lambda: (slow / "model.yaml").write_text((tiny_models_dir / "tiny" / "model.yaml").read_text())
        )
        writer.start()
        wait_ready(base, process)
        writer.join()
        r = httpx.post(f"{base}/v1/models/slow/classify", files=[("image", ("a.png", image, "image/png"))])
        assert r.status_code == 200, r.text


def test_a_process_sharing_its_port_takes_connections_only_once_ready(tiny_models_dir: Path) -> None:
    """Beside a ready sibling on the same port (SO_REUSEPORT), a process still loading must not
    listen: the kernel would hand it some of the connections, and it could only answer 503."""
    import os
    import threading

    held = tiny_models_dir / "held"
    held.mkdir()
    for name in ("trunk.safetensors", "head.safetensors", "lambda_net.safetensors"):
        (held / name).symlink_to(tiny_models_dir / "tiny" / name)
    os.mkfifo(held / "model.yaml")  # holds this process's loading until the test writes it
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    image = png_bytes(np.zeros((8, 8, 3), np.uint8))
    with (
        start_server(tiny_models_dir, port, "--reuse-port", "--models", "tiny") as ready,
        start_server(tiny_models_dir, port, "--reuse-port", "--models", "held") as loading,
    ):
        wait_ready(base, ready)
        time.sleep(2.0)  # the loading process has long been started (and would listen by now)
        assert loading.poll() is None, loading.output()
        for _ in range(30):  # new connections, spread over every process listening on the port
            r = httpx.post(f"{base}/v1/models/tiny/classify", files=[("image", ("a.png", image, "image/png"))])
            assert r.status_code == 200, r.text
        writer = threading.Thread(
            target=lambda: (held / "model.yaml").write_text((tiny_models_dir / "tiny" / "model.yaml").read_text())
        )
        writer.start()
        writer.join()
        deadline = time.monotonic() + 60
        while "ready: serving held" not in loading.output():
            assert time.monotonic() < deadline and loading.poll() is None, loading.output()
            time.sleep(0.2)


def test_sigterm_while_loading_stops_at_once(tiny_models_dir: Path) -> None:
    import os

    os.mkfifo(tiny_models_dir / "tiny" / "model.yaml.pipe")
    (tiny_models_dir / "stuck").mkdir()
    os.rename(tiny_models_dir / "tiny" / "model.yaml.pipe", tiny_models_dir / "stuck" / "model.yaml")  # never written
    port = free_port()
    with start_server(tiny_models_dir, port, "--models", "stuck") as process:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.output()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.output()

"""Slow clients cannot hold the server's connections: a header not complete in time gets 408 and
the connection closed, a silent connection is closed, a body that stops coming gets 408; keep-alive
connections between requests are left alone. A real server: the header timeout lives in uvicorn's
protocol, below the ASGI app."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.apptools import ServerProcess, free_port, start_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.adversarial]

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    from tests.imagetools import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root)
    port = free_port()
    with start_server(root, port, "--header-timeout-s", str(TIMEOUT_S), "--body-timeout-s", str(TIMEOUT_S)) as process:
        wait_ready(f"http://127.0.0.1:{port}", process)
        yield process, port


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10 * TIMEOUT_S)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def read_one_response(sock: socket.socket) -> bytes:
    """One whole response on a kept-alive connection: the head, then Content-Length bytes of body
    (the server may send them in separate segments, so one recv is not one response)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    length = int(lengths[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data + body!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_header_not_complete_in_time_gets_408_and_the_connection_closed(server: tuple[ServerProcess, int]) -> None:
    with connect(server[1]) as sock:
        sock.sendall(b"POST /v1/models/tiny/classify HTTP/1.1\r\nHost: test\r\nContent-Type: applic")
        response, waited = read_until_closed(sock)
    status, body = status_and_json(response)
    assert status == 408 and body["error"]["code"] == "request_timeout", response
    assert TIMEOUT_S * 0.8 <= waited < TIMEOUT_S * 5


def test_a_connection_that_never_sends_is_closed_without_an_answer(server: tuple[ServerProcess, int]) -> None:
    with connect(server[1]) as sock:
        response, waited = read_until_closed(sock)
    assert response == b"" and waited < TIMEOUT_S * 5


def test_a_header_trickled_byte_by_byte_is_timed_from_its_first_byte(server: tuple[ServerProcess, int]) -> None:
    request = b"GET /health/live HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 400 + b"\r\n\r\n"
    with connect(server[1]) as sock:
        started = time.monotonic()
        closed = False
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.01)
            if time.monotonic() - started > TIMEOUT_S * 5:
                break
        if not closed:
            response, _ = read_until_closed(sock)
            assert response.startswith(b"HTTP/1.1 408"), response
    assert time.monotonic() - started < TIMEOUT_S * 5


def test_a_body_that_stops_coming_gets_408(server: tuple[ServerProcess, int]) -> None:
    with connect(server[1]) as sock:
        sock.sendall(
            b"POST /v1/models/tiny/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n" + b'{"images": [{"b64": "'
        )
        response, waited = read_until_closed(sock)
    status, body = status_and_json(response)
    assert status == 408 and "EQUISERVE_BODY_TIMEOUT_S" in body["error"]["message"], response
    assert waited < TIMEOUT_S * 5


def test_keep_alive_connections_outlive_the_header_timeout(server: tuple[ServerProcess, int]) -> None:
    request = b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n"
    with connect(server[1]) as sock:
        for _ in range(2):
            sock.sendall(request)
            response = read_one_response(sock)
            assert response.startswith(b"HTTP/1.1 200"), response
            time.sleep(TIMEOUT_S * 2)  # idle between requests: the keep-alive timeout's business


def test_many_slow_clients_neither_stay_nor_keep_others_out(server: tuple[ServerProcess, int]) -> None:
    port = server[1]
    held = [connect(port) for _ in range(200)]
    try:
        for sock in held:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: te")
        started = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0
        for sock in held:
            response, _ = read_until_closed(sock)
            assert response.startswith(b"HTTP/1.1 408"), response
    finally:
        for sock in held:
            sock.close()
    assert server[0].poll() is None

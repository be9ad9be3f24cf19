"""``python -m app serve``: uvicorn with a graceful drain. Every flag is also an
``EQUISERVE_*`` env var (``--max-batch-size`` for ``EQUISERVE_MAX_BATCH_SIZE``); flags win."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from app import tracing
from app.command_line import configure_server_logging, require_extra
from app.config import Settings
from app.tasks import TASKS, task_limits
from app.tasks.base import env_names

log = logging.getLogger("equiserve")


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser("serve", help="start the HTTP server")
    settings_parser(parser)
    parser.set_defaults(run=run_serve)


def settings_parser(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, and one per limit of each registered task (``--act-max-observations``)."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (default: {field.default}) [env EQUISERVE_{name.upper()}]"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)
    for task in TASKS:
        limits = task_limits(task)
        for name, field in limits.model_fields.items():
            env = env_names(limits, name)[0]
            parser.add_argument(
                f"--{task}-{name.replace('_', '-')}",
                dest=f"limit:{env}",
                default=None,
                help=f"{task}: {field.description} (default: {field.default}; a model's model.yaml `limits:` "
                f"overrides it) [env {env}]",
            )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The server's Settings from the flags over the env; task limits given as flags become their
    env vars, which each model's limits (and every server process) read."""
    for dest, value in vars(args).items():
        if dest.startswith("limit:") and value is not None:
            os.environ[dest.removeprefix("limit:")] = str(value)
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    configure_server_logging(settings.log_level)
    if settings.grpc_port:
        if settings.ray:
            raise SystemExit("--grpc-port is not served with --ray (Ray Serve's proxy speaks HTTP): leave it unset")
        require_extra("grpc", "serve --grpc-port", "grpc", "grpc_health", "grpc_reflection", "google.protobuf")
    if settings.ray:  # Ray Serve replicas of the same app (app/ray_serve.py)
        require_extra("ray", "serve --ray", "ray")
        tracing.require(settings.tracing)  # each replica traces (app.ray_serve); the driver does not
        from app.ray_serve import serve_on_ray

        code = serve_on_ray(settings)
    else:
        code = serve(settings)
    # The drain is done and every answer sent. Tearing down the interpreter (torch's and
    # onnxruntime's destructors, module by module) takes seconds and serves no one, while an
    # orchestrator waits for the exit to start the next replica: exit now, logs flushed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(settings: Settings) -> int:
    if settings.processes > 1:
        return serve_processes(settings)
    from app.server import create_app

    if tracing.start(settings.tracing):  # each process of --processes traces its own requests
        log.info("tracing: on (OpenTelemetry; docs/tracing.md)")
    # Alone on its port, a server listens while its models load (health answers, inference is 503).
    # Sharing the port with its siblings (SO_REUSEPORT: --processes), it listens only once ready:
    # the kernel spreads connections over every listening process and would hand some to one that
    # can only answer 503 while a sibling is ready.
    app = create_app(settings, load_in_background=not settings.reuse_port)
    engine = app.state.engine
    server = DrainingServer(uvicorn_config(app, settings), engine, settings.drain_timeout_s)
    try:
        server.run(listening_socket(settings) if settings.reuse_port else None)
    finally:
        tracing.shutdown()  # the spans still buffered are exported: run_serve ends with os._exit
    return 0 if server.started and engine.load_error is None else 1


def listening_socket(settings: Settings) -> socket.socket:
    """host:port bound with SO_REUSEPORT: the kernel spreads new connections over every process
    bound this way (Linux), so several servers share one port without a proxy."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    return sock


def setting_environment(settings: Settings) -> dict[str, str]:
    """``settings`` as ``EQUISERVE_*`` variables, as a child process reads them back."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        env[f"EQUISERVE_{name.upper()}"] = str(value)
    return env


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM it when the supervisor dies, even by SIGKILL (Linux), so
    no server is left holding the port."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def serve_processes(settings: Settings) -> int:
    """``settings.processes`` servers on one port (SO_REUSEPORT), each a ``python -m app serve``
    with the same settings. SIGTERM/SIGINT go to every one of them (each drains on its own);
    when one exits, the others are stopped too, and the exit status is the worst of theirs, so
    an orchestrator sees one replica fail, not a degraded one that keeps running.

    Their metrics are merged (``app.metrics``): in the folder ``PROMETHEUS_MULTIPROC_DIR`` names,
    which must then be empty at the start, or else in a fresh one removed at the end."""
    from prometheus_client import multiprocess

    from app.metrics import MULTIPROCESS_DIR

    given = os.environ.get(MULTIPROCESS_DIR)
    metrics_dir = given or tempfile.mkdtemp(prefix="equiserve-metrics-")
    try:
        children = _start_children(settings, {MULTIPROCESS_DIR: metrics_dir})
        codes = _supervise(children)
        for child in children:
            multiprocess.mark_process_dead(child.pid, metrics_dir)  # its live gauges go
    finally:
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return max((abs(code) for code in codes), default=0)


def _start_children(settings: Settings, extra_env: dict[str, str]) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        **setting_environment(settings),
        **extra_env,
        "EQUISERVE_PROCESSES": "1",
        "EQUISERVE_REUSE_PORT": "true",
    }
    children = [
        subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, preexec_fn=_die_with_parent)
        for _ in range(settings.processes)
    ]
    log.info("serving with %d processes on %s:%d: pids %s", len(children), settings.host, settings.port,
             [c.pid for c in children])  # fmt: skip
    return children


def _supervise(children: list[subprocess.Popen]) -> list[int]:
    """Forward SIGTERM/SIGINT to every child until all have exited; their exit codes."""
    signalled: list[int] = []

    def forward(sig: int, frame: Any) -> None:
        signalled.append(sig)
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(child.poll() is None for child in children):
        time.sleep(0.2)
    if not signalled:  # one died on its own: stop the others (one signal: they drain; a second would not)
        forward(signal.SIGTERM, None)
    return [child.wait() for child in children]


def uvicorn_config(app: Any, settings: Settings) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # our middleware writes the one access line per request
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.keep_alive_s,
        http=header_timeout_protocol(settings.header_timeout_s),
    )


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's httptools protocol with a header timeout, which uvicorn lacks: a connection that
    sends nothing, or a request whose header is not complete ``timeout_s`` after its first byte, is
    answered 408 and closed. Without it a client holding partial headers (slowloris) keeps its
    connection, and its file descriptor, forever; the ASGI app never sees such a request, so no
    middleware can time it out. The body, once the app reads it, is timed by the middleware."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    body = b'{"error": {"code": "request_timeout", "message": "the request header took too long"}}'
    response = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        header_timer: asyncio.TimerHandle | None = None

        started = False  # a byte of a request has come since the last complete header

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm()  # uvicorn arms its keep-alive timer only after a first response

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.started = True
            self.arm()

        def on_headers_complete(self) -> None:
            self.started = False
            self.disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def arm(self) -> None:
            self.disarm()
            self.header_timer = self.loop.call_later(timeout_s, self.header_timed_out)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def header_timed_out(self) -> None:
            self.header_timer = None
            if self.transport.is_closing():
                return
            in_flight = self.cycle is not None and not self.cycle.response_complete
            # A connection that never sent a byte (a browser's preconnect) is closed without a word;
            # nor may an answer cut into a response still being written for an earlier request.
            if self.started and not in_flight:
                self.transport.write(response)
            log.info("closed a connection from %s: header not complete within %.0f s", self.client, timeout_s)
            self.transport.close()

    return HeaderTimeoutProtocol


class DrainingServer:
    """uvicorn, with a graceful drain on SIGTERM/SIGINT.

    uvicorn alone stops listening at once. We first turn readiness to 503 and answer new
    requests with 503 while everything already accepted finishes (or ``drain_timeout_s``
    passes); only then does uvicorn shut down, and the lifespan closes the batchers.
    A second signal stops at once.
    """

    def __init__(self, config: Any, engine: Any, drain_timeout_s: float) -> None:
        import uvicorn

        engine_ref, timeout = engine, drain_timeout_s

        class _Server(uvicorn.Server):
            drain_started: float | None = None

            def handle_exit(self, sig: int, frame: Any) -> None:
                if self.drain_started is None and sig in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal %s: draining (readiness 503, new requests 503)", signal.Signals(sig).name)
                    self.drain_started = time.monotonic()
                    engine_ref.begin_drain()
                    return
                super().handle_exit(sig, frame)

            async def on_tick(self, counter: int) -> bool:
                if engine_ref.load_error is not None:  # a model did not load: stop, to exit non-zero
                    self.should_exit = True
                if self.drain_started is not None:
                    waited = time.monotonic() - self.drain_started
                    if engine_ref.idle or waited > timeout:
                        if not engine_ref.idle:
                            log.warning("drain timeout after %.1f s with requests in flight", waited)
                        self.should_exit = True
                return await super().on_tick(counter)

        self._server = _Server(config)

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    def run(self, sock: socket.socket | None = None) -> None:
        self._server.run(sockets=[sock] if sock is not None else None)

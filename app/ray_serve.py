"""equiserve on Ray Serve: ``python -m app serve --ray`` or ``serve run deploy/ray-serve.yaml``.

Each replica is a Ray actor holding ONE ``Engine``: the FastAPI app of ``create_app`` is the
ingress, so the HTTP contract is the single process's, behind Ray's proxy; the app's lifespan
loads the models once per replica and our batcher runs inside it. Every answer names its
replica in ``X-Replica``.

Metrics: the ingress ``/metrics`` reaches one replica per request, so each replica also serves
its own ``/metrics`` (the same route, API-key rule included) on a free port of its node and
registers it in Ray's key-value store. The driver turns the live registrations into Prometheus
``file_sd`` targets labelled by ``replica``, ``deployment`` and ``application``, next to the
targets of Ray's own metrics agents (``ray_serve_*``): ``<ray_metrics_dir>/equiserve_replicas.json``
and ``ray_nodes.json``, which docker/prometheus/prometheus.yml reads.

Faults: a request whose replica dies before answering is sent once more, to a live replica, by a
middleware in Ray's HTTP proxy (:class:`ProxyAnswers`; inference has no side effects); if
that fails too, it is answered 503 with ``Retry-After``. Ray starts a replacement replica.

Shutdown (SIGTERM/SIGINT to the driver): every replica turns draining (readiness 503, new
requests 503, as the single server does), then the application is deleted: Ray waits for the
requests in flight (``graceful_shutdown_timeout_s`` = ``drain_timeout_s``), and the lifespan
stops each engine, which answers everything it accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import uvicorn
from ray import serve
from ray.experimental import internal_kv
from ray.serve.deployment import Application
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import tracing
from app.api.middleware import error_json
from app.config import Settings

log = logging.getLogger("equiserve.ray")
serve_log = logging.getLogger("ray.serve")  # configured in Ray's proxy, unlike ours

APP_NAME = "equiserve"
SERVE_NAMESPACE = "serve"  # where Ray Serve names its actors
KV_NAMESPACE = "equiserve"
KV_PREFIX = "metrics-target:"
REPLICA_TARGETS = "equiserve_replicas.json"
NODE_TARGETS = "ray_nodes.json"
TARGETS_REFRESH_S = 2.0
DRAIN_KEY = "drain:" + APP_NAME  # set by the driver: every replica begins its drain
DRAIN_POLL_S = 0.25
# Ray's proxy calls this to get its extra middlewares (the env var must be set where the proxy starts).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "app.ray_serve:proxy_middlewares"


def metrics_dir(settings: Settings) -> Path:
    return settings.ray_metrics_dir or Path(tempfile.gettempdir()) / "equiserve-prometheus"


# -- the replica ---------------------------------------------------------------------------------


class ReplicaHeader:
    """ASGI middleware: every HTTP answer carries ``X-Replica: <replica id>``, and one
    ``X-Request-ID``: Ray's proxy adds its own (the client's, or one it made and passed on)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (b"x-replica", replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*kept, self.header]
            await send(message)

        await self.app(scope, receive, named)


class MetricsOnly:
    """The app's own ``GET /metrics`` and nothing else: what a replica's metrics port serves
    (inference goes through Ray's proxy)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/metrics":
            await PlainTextResponse("this port serves /metrics only", status_code=404)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ProxyAnswers:
    """Ray proxy middleware: what Ray's proxy would answer itself, in the app's terms.

    * A request that got no answer at all (its replica died; Ray's proxy then returns without
      a response) is sent once more with the same body, which Ray routes to a live replica
      (``X-Retried: 1``); failing again, it is answered 503 ``replica_unavailable``.
    * The proxy's own 404 (no X-Replica: no application behind "/", i.e. it is starting or
      has been deleted in a drain) becomes 503 ``not_ready``, as the single server answers then.

    Both 503s carry ``Retry-After``. An answer that has started is never repeated, so every
    request gets exactly one.
    """

    def __init__(self, app: ASGIApp, retries: int = 1) -> None:
        self.app = app
        self.retries = retries

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body: list[Message] = []  # the request's messages so far, replayed to a retry
        position = 0  # of the current attempt in body
        attempt = 0
        disconnected = started = unrouted = False

        async def replaying_receive() -> Message:
            nonlocal position, disconnected
            if position < len(body):
                position += 1
                return body[position - 1]
            message = await receive()
            if message["type"] == "http.request":
                body.append(message)
                position += 1
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        async def checked_send(message: Message) -> None:
            nonlocal started, unrouted
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                if message["status"] == 404 and b"x-replica" not in names:
                    unrouted = True
                    return
                started = True
                if attempt:
                    message["headers"] = [*message.get("headers", []), (b"x-retried", str(attempt).encode())]
            if not unrouted:
                await send(message)

        while True:
            position = 0
            await self.app(scope, replaying_receive, checked_send)
            if started or disconnected or unrouted or attempt == self.retries:
                break
            attempt += 1
            serve_log.warning("%s %s: its replica stopped before answering; sending it again",
                              scope["method"], scope["path"])  # fmt: skip
        if started or disconnected:
            return
        if unrouted:
            code, message = "not_ready", "the service is starting or shutting down"
        else:
            code, message = "replica_unavailable", "the replica handling this request stopped; retry"
        request_id = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1") or None
        payload, headers = error_json(503, code, message, request_id)
        await send({"type": "http.response.start", "status": 503, "headers": [*headers, (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": payload})


def proxy_middlewares() -> list[Any]:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.ray_serve:proxy_middlewares``."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyAnswers)]


class _MetricsServer(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()  # signals belong to the Ray worker


def replica_settings(settings: Settings) -> Settings:
    """What a replica runs with, where it differs from a server of its own:

    * as many compute threads as the CPUs Ray reserves for it, unless set;
    * its compute threads at the process's own priority, unless ``compute_nice`` is set. Ray
      starts every actor of a node in one session, which Linux schedules as one group, and a
      nice increment weighs threads within their group: at nice +10 the replica's compute
      threads would yield to every other busy actor on the node, not only to its own event
      loop (bench/results/service_cpu_nice_foreign_load.md). Ray's proxy also bounds what
      reaches a replica (``max_ongoing_requests``), so the event loop it would protect is
      not flooded the way a server's own is.
    """
    update: dict[str, int] = {}
    if settings.torch_threads is None:
        update["torch_threads"] = max(1, math.ceil(settings.replica_cpus))
    if "compute_nice" not in settings.model_fields_set:
        update["compute_nice"] = 0
    return settings.model_copy(update=update) if update else settings


@serve.ingress()  # late-bound: each replica builds its own app in __serve_build_asgi_app__
class EquiserveReplica:
    def __init__(self, settings: Settings) -> None:
        from app.command_line import configure_server_logging
        from app.server import create_app

        configure_server_logging(settings.log_level)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.actor_name = context.replica_id.to_full_id_str()
        self.labels = {"replica": self.replica, "deployment": context.deployment, "application": context.app_name}
        # Ray's proxy hands the replica the client's headers as they came, traceparent included: the
        # replica's middleware continues the client's trace. Each replica is one service instance.
        tracing.start(settings.tracing, {"service.instance.id": self.replica, "equiserve.replica": self.replica})
        self.web = create_app(settings)
        self.web.add_middleware(ReplicaHeader, replica=self.replica)
        self._metrics: tuple[_MetricsServer, asyncio.Task] | None = None
        self._drain_watch: asyncio.Task | None = None

    async def __serve_build_asgi_app__(self) -> ASGIApp:
        # Ray runs the app's lifespan (load, warm up, batchers) right after this returns.
        await self._start_metrics_listener()
        self._drain_watch = asyncio.get_running_loop().create_task(self._watch_drain())
        return self.web

    async def _watch_drain(self) -> None:
        """The driver's drain: readiness 503 and new requests 503 while Ray lets those in flight finish."""
        while not await asyncio.to_thread(internal_kv._internal_kv_exists, DRAIN_KEY, namespace=KV_NAMESPACE):
            await asyncio.sleep(DRAIN_POLL_S)
        log.info("replica %s draining (readiness 503, new requests 503)", self.replica)
        self.web.state.engine.begin_drain()

    def check_health(self) -> None:
        engine = self.web.state.engine
        if not (engine.ready or engine.draining):
            raise RuntimeError("the engine is not serving")

    async def _start_metrics_listener(self) -> None:
        host = ray.util.get_node_ip_address()
        sock = socket.create_server((host, 0))
        config = uvicorn.Config(MetricsOnly(self.web), lifespan="off", log_level="warning", access_log=False)
        server = _MetricsServer(config)
        self._metrics = server, asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        target = f"{host}:{sock.getsockname()[1]}"
        entry = {"target": target, "actor": self.actor_name, "labels": self.labels}
        internal_kv._internal_kv_put(KV_PREFIX + self.actor_name, json.dumps(entry), namespace=KV_NAMESPACE)
        log.info("replica %s: metrics on http://%s/metrics", self.replica, target)

    async def __del__(self) -> None:
        # Called after Ray ran the lifespan's shutdown (the engine has answered everything).
        watch = getattr(self, "_drain_watch", None)
        if watch is not None:
            watch.cancel()
        with contextlib.suppress(Exception):
            internal_kv._internal_kv_del(KV_PREFIX + getattr(self, "actor_name", ""), namespace=KV_NAMESPACE)
        metrics = getattr(self, "_metrics", None)  # None: the replica failed before listening
        if metrics is not None:
            server, task = metrics
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(tracing.shutdown)  # its buffered spans are exported before the actor goes


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve deployment options from the settings (``serve --ray`` flags / env vars)."""
    actor: dict[str, Any] = {"num_cpus": settings.replica_cpus}
    # The OpenTelemetry configuration goes with each replica, also to the nodes of a cluster the
    # driver joined (whose workers do not inherit its environment).
    otel = {name: value for name, value in os.environ.items() if name.startswith("OTEL_")}
    if otel:
        actor["runtime_env"] = {"env_vars": otel}
    options: dict[str, Any] = {
        "name": APP_NAME,
        "ray_actor_options": actor,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    if settings.max_replicas is None:
        options["num_replicas"] = settings.replicas
        return options
    low = 1 if settings.min_replicas is None else settings.min_replicas
    if low > settings.max_replicas:
        raise ValueError(f"min_replicas {low} > max_replicas {settings.max_replicas}")
    options["autoscaling_config"] = {
        "min_replicas": low,
        "max_replicas": settings.max_replicas,
        "initial_replicas": min(max(settings.replicas, low), settings.max_replicas),
        "target_ongoing_requests": settings.target_ongoing_requests,
    }
    return options


def application(settings: Settings) -> Application:
    deployment = serve.deployment(EquiserveReplica, **deployment_options(settings))
    return deployment.bind(replica_settings(settings))


def build(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run app.ray_serve:build key=value ...`` and Serve config
    files (``import_path``): ``args`` are Settings fields; the rest comes from ``EQUISERVE_*``."""
    return application(Settings(**args))


# -- Prometheus targets --------------------------------------------------------------------------


def _actor_alive(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def replica_targets() -> list[dict[str, Any]]:
    """file_sd groups of the live replicas' metrics listeners; registrations of dead ones are dropped."""
    groups = []
    for key in internal_kv._internal_kv_list(KV_PREFIX, namespace=KV_NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw is None:
            continue
        entry = json.loads(raw)
        if not _actor_alive(entry["actor"]):
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
            continue
        groups.append({"targets": [entry["target"]], "labels": entry["labels"]})
    return sorted(groups, key=lambda g: g["labels"]["replica"])


def node_targets() -> list[dict[str, Any]]:
    """file_sd groups of every live Ray node's metrics agent (``ray_*`` and ``ray_serve_*``)."""
    return [
        {"targets": [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}"], "labels": {"ray_node": n["NodeID"][:12]}}
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


def _write_if_changed(path: Path, groups: list[dict[str, Any]]) -> None:
    text = json.dumps(groups, indent=1) + "\n"
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: Prometheus never reads half a file


def write_targets(folder: Path) -> int:
    """Both file_sd files, rewritten when they change; returns the number of replica targets."""
    folder.mkdir(parents=True, exist_ok=True)
    replicas = replica_targets()
    _write_if_changed(folder / REPLICA_TARGETS, replicas)
    _write_if_changed(folder / NODE_TARGETS, node_targets())
    return len(replicas)


# -- the driver: python -m app serve --ray ---------------------------------------------------------


@contextlib.contextmanager
def _stop_event() -> Iterator[threading.Event]:
    """Set on the first SIGTERM/SIGINT; a second signal ends the driver at once."""
    stop = threading.Event()

    def handle(sig: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(128 + sig)
        log.info("signal %s: draining", signal.Signals(sig).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_on_ray(settings: Settings) -> int:
    """Start (or join) Ray, run the application, keep the Prometheus targets fresh until a
    signal, then drain. Returns the exit code."""
    local = settings.ray_address is None
    if local:
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # inherited by the proxy we start
        ray.init(include_dashboard=False)
    else:
        ray.init(address=settings.ray_address)
    http_options = {"host": settings.host, "port": settings.port, "keep_alive_timeout_s": settings.keep_alive_s}
    serve.start(http_options=http_options)
    internal_kv._internal_kv_del(DRAIN_KEY, namespace=KV_NAMESPACE)  # a previous run's
    targets = metrics_dir(settings)
    try:
        with _stop_event() as stop:
            serve.run(application(settings), name=APP_NAME, route_prefix="/")
            log.info("serving on http://%s:%d through Ray Serve; Prometheus targets in %s",
                     settings.host, settings.port, targets)  # fmt: skip
            while not stop.is_set():
                try:
                    write_targets(targets)
                except Exception as exc:  # the cluster is busy: keep serving, try again
                    log.warning("could not refresh the Prometheus targets: %s", exc)
                stop.wait(TARGETS_REFRESH_S)
            internal_kv._internal_kv_put(DRAIN_KEY, "1", namespace=KV_NAMESPACE)
            time.sleep(2 * DRAIN_POLL_S)  # every replica has seen it
            serve.delete(APP_NAME)  # waits for requests in flight; each engine answers what it accepted
            log.info("stopped: every replica drained")
        write_targets(targets)
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m app.ray_serve --address auto --dir DIR``: keep the Prometheus targets of an
    application deployed with ``serve run``/``serve deploy`` fresh (``serve --ray`` does this itself)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--address", default="auto", help="the Ray cluster to join")
    parser.add_argument("--dir", type=Path, default=None, help="file_sd folder (EQUISERVE_RAY_METRICS_DIR)")
    args = parser.parse_args(argv)
    folder = args.dir or metrics_dir(Settings())
    ray.init(address=args.address)
    with _stop_event() as stop:
        while not stop.is_set():
            write_targets(folder)
            stop.wait(TARGETS_REFRESH_S)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The standing adversarial suite's corpus over EVERY route: every route the app mounts (found by
walking its router, so a new route is covered the day it is added), every task's model, v1 and v2,
JSON and multipart, hostile path parameters, hostile values in every field of a valid body, broken
framing and wrong content types, with and without the API key. Every answer is a 4xx with a JSON
error in the route's protocol's shape, or a 200 whose JSON is standard (no NaN, no infinity); never
a 5xx; and afterwards the server is ready and answers every task.

The rest of the suite (all marked ``adversarial``; run it alone with ``pytest -m adversarial``):
``test_api_schema_fuzz`` (schemathesis over the whole OpenAPI document), ``test_server_slow_clients``
(slow headers and bodies), ``test_api_hostile_inputs`` (hostile image files), the lock-out scenario
(``test_engine.py::test_admission_refuses_what_would_only_wait_past_its_deadline`` and the batcher's
property test) and, here, an unauthenticated flood against a real server.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.tasks import TASKS
from tests.apptools import free_port, make_settings, serving, start_server, wait_ready
from tests.tasktools import EXAMPLES, grey_png, write_every_task

pytestmark = pytest.mark.adversarial

KEY = "adversarial-key"
B64 = base64.b64encode(grey_png()).decode()
V2_BODIES: dict[str, dict[str, Any]] = {
    "classify": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]},
    "embed": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]},
    "generate": {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["The man worked as"]}],
        "parameters": {"max_new_tokens": 2, "temperature": 0},
    },
}
HOLE = "\u2063HOSTILE\u2063"  # a placeholder no valid body holds; replaced by raw JSON text

# Raw JSON text put in place of one field: values that overflow, nest, break Unicode or types.
HOSTILE_VALUES: dict[str, str] = {
    "null": "null",
    "true": "true",
    "overflowing float": "1e999",
    "negative overflow": "-1e999",
    "NaN literal": "NaN",
    "Infinity literal": "Infinity",
    "float32 max": "3.4e38",
    "huge integer": str(2**80),
    "negative integer": str(-(2**63) - 1),
    "minus zero": "-0.0",
    "empty string": '""',
    "lone surrogate": '"\\ud800"',
    "NUL and newline": '"a\\u0000b\\nc"',
    "right-to-left override": '"\\u202eevil"',
    "long string": json.dumps("w" * 100_000),
    "empty list": "[]",
    "empty object": "{}",
    "deep list": "[" * 5_000 + "]" * 5_000,
    "deep object": '{"a":' * 5_000 + "1" + "}" * 5_000,
    "long list": "[" + ",".join(["0"] * 50_000) + "]",
}
# Whole bodies that are not what any route wants.
HOSTILE_BODIES: dict[str, bytes] = {
    "empty": b"",
    "not JSON": b"hello",
    "truncated": b'{"a": [1, 2',
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"text"',
    "invalid UTF-8": b'{"a": "\xff\xfe"}',
    "UTF-16": '{"a": 1}'.encode("utf-16"),
    "duplicate keys": b'{"a": 1, "a": 2}',
    "deep nesting": b"[" * 200_000 + b"]" * 200_000,
    "NUL bytes": b"\x00" * 1000,
}
HOSTILE_NAMES = [
    "no-such-model", "%0Aforged%20line", "%00", "x" * 4000, "%F0%9F%98%80", "%ED%A0%80", "..%2F..%2Fetc%2Fpasswd",
    "%25", "%C0%AF",
]  # fmt: skip
HOSTILE_VERSIONS = ["1", "0", "-1", "99999999999999999999999", "one", "%00"]
CONTENT_TYPES: list[str | bytes] = [
    "application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
    "multipart/form-data; boundary=", "multipart/form-data; boundary=x" + "y" * 5000, "image/png",
    "application/json; charset=utf-16", "\u00e9/\u00e9".encode("latin-1"),
]  # fmt: skip


def mounted_routes(app: FastAPI) -> list[tuple[str, frozenset[str]]]:
    """(path template, methods) of every route the app mounts, included routers included."""
    found: list[tuple[str, frozenset[str]]] = []

    def walk(routes: list[Any]) -> None:
        for route in routes:
            if hasattr(route, "path"):
                found.append((route.path, frozenset(getattr(route, "methods", None) or {"GET"})))
            else:
                walk(getattr(route, "original_router", route).routes)

    walk(app.routes)
    # Every documented path is reached by a mounted template: the walk missed no router.
    mounted = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$") for path, _ in found]
    for documented in app.openapi()["paths"]:
        assert any(template.match(documented) for template in mounted), documented
    return found


def model_of(path: str) -> str | None:
    """The model a templated path's ``{name}`` should name to reach a model: its task's example."""
    for task in TASKS:
        if path.endswith(f"/{task}"):
            return EXAMPLES[task].model
    return EXAMPLES["classify"].model if path.startswith("/v2/") else None


def concrete_paths(template: str) -> list[str]:
    """The template with each parameter set to a served model and to each hostile value."""
    if "{" not in template:
        return [template]
    served = model_of(template) or "tiny"
    names = [served, *HOSTILE_NAMES, *(e.model for e in EXAMPLES.values() if e.model != served)]
    paths = [template.replace("{name}", name).replace("{version}", "1") for name in names]
    if "{version}" in template:
        paths += [template.replace("{name}", served).replace("{version}", v) for v in HOSTILE_VERSIONS]
    return paths


def holes(body: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every field of a JSON body (first element of each list), depth first."""
    if path:
        yield path
    if isinstance(body, dict):
        for key, value in body.items():
            yield from holes(value, (*path, key))
    elif isinstance(body, list) and body:
        yield from holes(body[0], (*path, 0))


def with_hole(body: Any, path: tuple[Any, ...]) -> Any:
    copy = json.loads(json.dumps(body))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = HOLE
    return copy


def hostile_field_bodies(body: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
    for path in holes(body):
        text = json.dumps(with_hole(body, path))
        for label, value in HOSTILE_VALUES.items():
            yield f"{'.'.join(map(str, path))} = {label}", text.replace(json.dumps(HOLE), value).encode()
    yield "an extra field", json.dumps({**body, "extra": 1}).encode()


def multipart_bodies() -> Iterator[tuple[str, bytes, str]]:
    png = grey_png()

    def form(*parts: tuple[str, bytes, str | None]) -> bytes:
        out = b""
        for headers, content, _ in parts:
            out += b"--B\r\n" + headers.encode("utf-8", "surrogatepass") + b"\r\n\r\n" + content + b"\r\n"
        return out + b"--B--\r\n"

    image = ('Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png', png, None)
    ct = "multipart/form-data; boundary=B"
    yield "no parts", b"--B--\r\n", ct
    yield "no closing boundary", form(image)[:-8], ct
    yield "wrong boundary", form(image), "multipart/form-data; boundary=C"
    yield "many tiny fields", form(image, *[('Content-Disposition: form-data; name="f"', b"x", None)] * 3000), ct
    yield "nested labels", form(image, ('Content-Disposition: form-data; name="labels"', b"[" * 5000, None)), ct
    yield "overflowing top_k", form(image, ('Content-Disposition: form-data; name="top_k"', b"1e999", None)), ct
    yield "NUL filename", form(('Content-Disposition: form-data; name="image"; filename="a\x00/../b"', png, None)), ct
    yield "non-UTF-8 field", b'--B\r\nContent-Disposition: form-data; name="\xff"\r\n\r\nx\r\n--B--\r\n', ct
    yield "huge header line", form(("X-Long: " + "h" * 200_000, png, None)), ct
    yield "image as text", form(('Content-Disposition: form-data; name="image"; filename="a"', b"text", None)), ct


def check_answer(path: str, response: httpx.Response, what: str) -> None:
    """The answer's status and shape: what every route must give every input."""
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    if response.request.method == "HEAD" or response.status_code in (204, 304):
        return
    kind = response.headers.get("content-type", "")
    if response.status_code >= 400:
        assert kind.startswith("application/json"), f"{what}: {response.status_code} {kind} {response.text[:200]}"
        error = response.json()["error"]
        if path.startswith("/v2"):
            assert isinstance(error, str) and error, f"{what}: {error!r}"
        else:
            assert {"code", "message"} <= set(error) and error["message"], f"{what}: {error!r}"
    elif kind.startswith("application/json"):
        json.loads(response.text, parse_constant=lambda c: pytest.fail(f"{what}: {c} in the answer"))


async def still_serving(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    started = time.perf_counter()
    assert (await client.get("/health/ready")).status_code == 200
    assert time.perf_counter() - started < 1.0
    for task, example in EXAMPLES.items():
        response = await client.post(f"/v1/models/{example.model}/{task}", json=example.body(), headers=headers)
        assert response.status_code == 200, (task, response.text[:300])


@pytest.fixture(scope="module")
def every_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_every_task(tmp_path_factory.mktemp("every-task"))


async def test_every_route_answers_every_hostile_input_with_a_clear_4xx(every_task: Path) -> None:
    async with serving(make_settings(every_task, max_body_bytes=4 * 1024 * 1024)) as (client, app):
        routes = mounted_routes(app)
        posts = [template for template, methods in routes if "POST" in methods]
        assert {f"/v1/models/{{name}}/{task}" for task in TASKS} <= set(posts)
        assert any(template.startswith("/v2/") for template in posts)
        sent = 0
        for template, methods in routes:
            for path in concrete_paths(template):
                for method in sorted(methods):
                    if method != "POST":
                        response = await client.request(method, path)
                        check_answer(path, response, f"{method} {path}")
                        sent += 1
                        continue
                    task = next((t for t in TASKS if template.endswith(f"/{t}")), None)
                    if template.startswith("/v2/"):
                        valid = V2_BODIES.get(next((t for t, e in EXAMPLES.items() if f"/{e.model}/" in path), ""))
                    else:
                        valid = EXAMPLES[task].body() if task else None
                    bodies = [(label, body) for label, body in HOSTILE_BODIES.items()]
                    if valid is not None and (path.startswith((f"/v1/models/{model_of(template)}/", "/v2/models/"))):
                        bodies += list(hostile_field_bodies(valid))
                    for label, body in bodies:
                        response = await client.post(path, content=body, headers={"content-type": "application/json"})
                        check_answer(path, response, f"POST {path} [{label}]")
                        sent += 1
                    for content_type in CONTENT_TYPES:
                        body = json.dumps(valid or {}).encode()
                        response = await client.post(path, content=body, headers={"content-type": content_type})
                        check_answer(path, response, f"POST {path} as {content_type!r}")
                        sent += 1
                    if task in ("classify", "embed"):
                        for label, body, content_type in multipart_bodies():
                            response = await client.post(path, content=body, headers={"content-type": content_type})
                            check_answer(path, response, f"POST {path} [multipart: {label}]")
                            sent += 1
        assert sent > 2000
        await still_serving(client, {})


async def test_without_the_key_every_protected_route_is_401_whatever_the_body(every_task: Path) -> None:
    async with serving(make_settings(every_task, api_key=KEY)) as (client, app):
        posts = [path for template, methods in mounted_routes(app) if "POST" in methods
                 for path in concrete_paths(template)[:2]]  # fmt: skip
        wrong_keys: list[dict[str, str | bytes]] = [
            {}, {"authorization": "Bearer wrong"}, {"authorization": "Basic " + KEY},
            {"authorization": b"Bearer " + KEY.encode() + b"\xe9"}, {"authorization": "Bearer " + KEY[:-1]},
        ]  # fmt: skip
        for path in posts:
            for headers in wrong_keys:
                for label, body in [*HOSTILE_BODIES.items(), ("valid", b'{"commands": ["jump"]}')]:
                    sent = {**headers, "content-type": "application/json"}
                    response = await client.post(path, content=body, headers=sent)
                    assert response.status_code == 401, (path, headers, label, response.text[:200])
                    check_answer(path, response, f"POST {path} [{label}] without the key")
        await still_serving(client, {"authorization": f"Bearer {KEY}"})


async def test_over_limit_chunked_bodies_are_413_on_every_route(every_task: Path) -> None:
    multipart_head = b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'

    async def chunks(head: bytes) -> Any:
        yield head
        for _ in range(40):
            yield b"a" * 100

    async with serving(make_settings(every_task, max_body_bytes=2048)) as (client, app):
        posts = [path for template, methods in mounted_routes(app) if "POST" in methods
                 for path in concrete_paths(template)[:1]]  # fmt: skip
        for path in posts:
            for content_type, head in (
                ("application/json", b'{"x": "'),
                ("multipart/form-data; boundary=B", multipart_head),
            ):
                response = await client.post(path, content=chunks(head), headers={"content-type": content_type})
                assert response.status_code == 413, (path, content_type, response.text[:200])
                check_answer(path, response, f"chunked POST {path}")


@pytest.mark.slow
def test_an_unauthenticated_flood_is_refused_without_reading_it_and_health_stays_fast(every_task: Path) -> None:
    """Clients without the key send big bodies to every inference route at once: each gets its 401
    before its body is read (the access log counts the bytes read), and the probes stay fast
    meanwhile (a real server: uvicorn's reads)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    body = b'{"images": [{"b64": "' + b"A" * (20 * 1024 * 1024) + b'"}]}'
    targets = [f"/v1/models/{e.model}/{task}" for task, e in EXAMPLES.items()] + ["/v2/models/tiny/infer"]
    statuses: list[int | str] = []
    stop = threading.Event()

    def flood(path: str) -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post(path, content=body, headers={"content-type": "application/json"})
                    statuses.append(response.status_code)
                except httpx.TransportError as exc:  # the server may close before the upload ends
                    statuses.append(type(exc).__name__)

    with start_server(every_task, port, "--api-key", KEY) as process:
        wait_ready(base, process)
        threads = [threading.Thread(target=flood, args=(path,)) for path in targets for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            slowest = 0.0
            for _ in range(20):
                started = time.perf_counter()
                assert httpx.get(f"{base}/health/live", timeout=10).status_code == 200
                slowest = max(slowest, time.perf_counter() - started)
                time.sleep(0.1)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert process.poll() is None
        # The access log says how much of each body the server read before answering: none of it.
        refused = re.findall(r"status=401 bytes=(\d+)", process.output())
    assert refused and max(map(int, refused)) < 1024 * 1024, refused[:20]
    answered = [s for s in statuses if isinstance(s, int)]
    assert answered and set(answered) == {401}, sorted(set(map(str, statuses)))
    assert slowest < 0.5, slowest

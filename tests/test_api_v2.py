"""The Open Inference Protocol (/v2) with real clients (tritonclient.http, the KServe SDK)
against a real `python -m app serve`: metadata, JSON and binary tensors, answers equal to
/v1's, and the protocol's errors."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from tritonclient.utils import InferenceServerException

from app.api.errors import install_error_handlers
from app.api.middleware import RequestContextMiddleware
from app.api.v2 import build_v2_router
from app.equivariance import Method
from app.errors import DeadlineExceeded, ModelNotFound, NotReady, QueueFull
from app.metrics import Metrics
from app.oip import HEADER_LENGTH as HEADER
from app.tasks.base import Timing
from app.tasks.generate.messages import GenerateOutput, GenerateRequest, TransformWeight, Usage
from tests.apptools import free_port, make_settings, start_server, wait_ready
from tests.imagetools import TINY_LABELS, jpeg_bytes, png_bytes, write_tiny_model

TRANSFORMS = ["identity", "rot90", "rot180", "rot270"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = tmp_path_factory.mktemp("v2-models")
    write_tiny_model(models)  # generate is checked with a stand-in engine: a language model would double the start
    port = free_port()
    process = start_server(models, port, "--max-batch-size", "4", "--classify-max-images", "4", "--no-warmup")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def image(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def pixels_of(*arrays: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] images -> FP32 [B, 3, H, W] in [0, 1]."""
    return np.stack([a.astype(np.float32).transpose(2, 0, 1) / 255 for a in arrays])


def v1_classify(base: str, files: list[bytes], method: str) -> list[dict[str, Any]]:
    r = httpx.post(
        f"{base}/v1/models/tiny/classify",
        files=[("image", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)],
        data={"method": method, "top_k": str(len(TINY_LABELS))},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["results"]


def assert_equal_to_v1(outputs: dict[str, np.ndarray], v1: list[dict[str, Any]], top_k: int) -> None:
    """Every /v2 output against the /v1 answer for the same images and method."""
    assert outputs["probabilities"].shape == (len(v1), len(TINY_LABELS))
    for row, result in enumerate(v1):
        scores = {p["index"]: p["score"] for p in result["predictions"]}
        expected = np.array([scores[i] for i in range(len(TINY_LABELS))], np.float32)
        np.testing.assert_allclose(outputs["probabilities"][row], expected, rtol=1e-5, atol=1e-6)
        lambdas = np.array([t["lambda"] for t in result["transforms"]], np.float32)
        np.testing.assert_allclose(outputs["lambda"][row], lambdas, rtol=1e-5, atol=1e-7)
        copy_top = [TINY_LABELS.index(t["top_label"]) for t in result["transforms"]]
        assert outputs["copy_top_index"][row].tolist() == copy_top
        assert outputs["top_index"][row].tolist() == [p["index"] for p in result["predictions"][:top_k]]
        labels = [e.decode() if isinstance(e, bytes) else e for e in outputs["top_label"][row]]
        assert labels == [p["label"] for p in result["predictions"][:top_k]]


# -- metadata ------------------------------------------------------------------------------------


def test_metadata_and_readiness_through_tritonclient(server: str) -> None:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    meta = client.get_server_metadata()
    assert meta["name"] == "equiserve" and "binary_tensor_data" in meta["extensions"]
    assert client.is_server_live() and client.is_server_ready()

    model = client.get_model_metadata("tiny")
    assert model["name"] == "tiny" and model["versions"] == ["1"] and model["platform"] == "equiserve_classify"
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in model["inputs"]} == {
        ("image", "BYTES", (-1,)),
        ("pixels", "FP32", (-1, 3, -1, -1)),
    }
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in model["outputs"]}
    assert outputs == {
        "probabilities": ("FP32", [-1, len(TINY_LABELS)]),
        "lambda": ("FP32", [-1, len(TRANSFORMS)]),
        "copy_top_index": ("INT64", [-1, len(TRANSFORMS)]),
        "top_index": ("INT64", [-1, -1]),
        "top_probability": ("FP32", [-1, -1]),
        "top_label": ("BYTES", [-1, -1]),
    }
    assert client.get_model_metadata("tiny", "1") == model

    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope")
    for call in (lambda: client.get_model_metadata("nope"), lambda: client.get_model_metadata("tiny", "2")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "404"


# -- answers equal to /v1 ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lambda", "equizero"])
def test_tritonclient_binary_images_answer_as_v1(server: str, method: str) -> None:
    files = [png_bytes(image(1)), jpeg_bytes(image(2, 64, 48))]
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    tensor = triton.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object))  # binary by default
    result = client.infer("tiny", [tensor], request_id="req-7", parameters={"method": method, "top_k": 2})

    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "tiny"
    names = [o["name"] for o in response["outputs"]]
    assert names == ["probabilities", "lambda", "copy_top_index", "top_index", "top_probability", "top_label"]
    # no outputs named: tritonclient asks for every output in binary
    assert result.get_output("probabilities")["parameters"]["binary_data_size"] == 2 * len(TINY_LABELS) * 4
    outputs = {name: result.as_numpy(name) for name in names}
    assert outputs["probabilities"].dtype == np.float32 and outputs["copy_top_index"].dtype == np.int64
    assert outputs["top_probability"].shape == (2, 2)
    np.testing.assert_allclose(outputs["probabilities"].sum(1), 1, atol=1e-5)
    assert_equal_to_v1(outputs, v1_classify(server, files, method), top_k=2)


def test_tritonclient_json_pixels_and_chosen_outputs(server: str) -> None:
    arrays = [image(3), image(4)]
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    tensor = triton.InferInput("pixels", [2, 3, 40, 56], "FP32")
    tensor.set_data_from_numpy(pixels_of(*arrays), binary_data=False)
    wanted = [
        triton.InferRequestedOutput("lambda", binary_data=False),
        triton.InferRequestedOutput("probabilities", binary_data=True),
    ]
    result = client.infer("tiny", [tensor], outputs=wanted, parameters={"method": "lambda"})
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["lambda", "probabilities"]  # only those asked, in order
    assert "data" in response["outputs"][0] and "binary_data_size" in response["outputs"][1]["parameters"]
    assert "id" not in response

    v1 = v1_classify(server, [png_bytes(a) for a in arrays], "lambda")
    for row, expected in enumerate(v1):
        scores = {p["index"]: p["score"] for p in expected["predictions"]}
        # the same crop and resize as a decoded file, up to float rounding
        np.testing.assert_allclose(result.as_numpy("probabilities")[row], [scores[i] for i in range(3)], atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("lambda")[row], [t["lambda"] for t in expected["transforms"]],
                                   atol=1e-5)  # fmt: skip


async def test_kserve_client_binary_and_json(server: str) -> None:
    files = [png_bytes(image(5, 32, 32))]
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
    try:
        assert await client.is_model_ready(server, "tiny")

        binary = InferInput("image", [1], "BYTES")
        binary.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
        request = InferRequest("tiny", [binary], request_id="k-1", parameters={"method": "equitune", "top_k": 3})
        answer = await client.infer(server, request, model_name="tiny")
        assert answer.id == "k-1"
        outputs = {o.name: o.as_numpy() for o in answer.outputs}
        assert_equal_to_v1(outputs, v1_classify(server, files, "equitune"), top_k=3)
        np.testing.assert_allclose(outputs["lambda"], 0.25)  # equitune: uniform weights

        # native size: no resize; JSON data
        pixels = InferInput("pixels", [1, 3, 32, 32], "FP32", data=pixels_of(image(5, 32, 32)).ravel().tolist())
        answer = await client.infer(server, InferRequest("tiny", [pixels], parameters={"method": "equitune"}),
                                    model_name="tiny")  # fmt: skip
        np.testing.assert_allclose(answer.get_output_by_name("probabilities").as_numpy(), outputs["probabilities"],
                                   atol=1e-5)  # fmt: skip
    finally:
        await client.close()

    # JSON data may also be nested as its shape
    nested = pixels_input([1, 3, 32, 32], pixels_of(image(5, 32, 32)).tolist())
    r = httpx.post(f"{server}/v2/models/tiny/infer", json={**nested, "parameters": {"method": "equitune"}})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], outputs["probabilities"].ravel(), atol=1e-5)


# -- errors ---------------------------------------------------------------------------------------


def binary_body(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    encoded = json.dumps(header).encode()
    return encoded + b"".join(chunks), {"Inference-Header-Content-Length": str(len(encoded))}


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def pixels_input(shape: list[int], data: list[Any], datatype: str = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": "pixels", "datatype": datatype, "shape": shape, "data": data}]}


def binary_image(chunk: bytes, size: int | None = None, after: bytes = b"") -> tuple[bytes, dict[str, str]]:
    """One binary BYTES input ``image`` whose data is ``chunk`` (``size``: what its header claims)."""
    parameters = {"binary_data_size": len(chunk) if size is None else size}
    return binary_body({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": parameters}]},
                       chunk, after)  # fmt: skip


PNG = png_bytes(image(9, 8, 8))
B64 = base64.b64encode(PNG).decode()
JSON_IMAGE = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]}
BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("wrong datatype", pixels_input([1, 3, 1, 1], [0.5] * 3, "FP64"), 400, "must be FP32, not FP64"),
    ("unknown datatype", pixels_input([1], [1], "FP8"), 400, "unknown datatype"),
    ("datatype not a string", pixels_input([1], [1], {}), 400, "unknown datatype"),  # type: ignore[arg-type]
    ("nested deeper than the shape", pixels_input([1, 3, 1, 1], [[[[[0.5]]]]] * 3), 400, "nested deeper"),
    ("nested past the JSON parser", (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}), 400,
     "nested too deeply"),
    ("shape vs data", pixels_input([1, 3, 2, 2], [0.5] * 5), 400, "holds 12 elements, but 'data' has 5"),
    ("wrong rank", pixels_input([3, 2, 2], [0.5] * 12), 400, "must have shape [-1, 3, -1, -1]"),
    ("strings as numbers", pixels_input([1, 3, 1, 1], ["a", "b", "c"]), 400, "must hold numbers"),
    ("ragged data", pixels_input([1, 3, 1, 1], [[0.5], [0.5, 0.5]]), 400, "not a regular nested list"),
    ("out of range", pixels_input([1, 3, 1, 1], [0.5, 2.0, 0.5]), 400, "in [0, 1]"),
    ("NaN", pixels_input([1, 3, 1, 1], [0.5, float("nan"), 0.5]), 400, "finite"),
    ("too many images", pixels_input([5, 3, 1, 1], [0.5] * 15), 413, "the limit is 4"),
    ("unknown input", {"inputs": [{**JSON_IMAGE["inputs"][0], "name": "img"}]}, 400, "unknown input 'img'"),
    ("no inputs", {"inputs": []}, 400, "'inputs' must be a non-empty list"),
    ("both inputs", {"inputs": [*JSON_IMAGE["inputs"], *pixels_input([1, 3, 1, 1], [0.5] * 3)["inputs"]]}, 400,
     "exactly one of"),
    ("no data", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}, 400, "no 'data'"),
    ("invalid base64", {"inputs": [{**JSON_IMAGE["inputs"][0], "data": ["%%%"]}]}, 400, "invalid base64"),
    ("not an image", binary_image(bytes_tensor(b"not an image")), 400, "not an image"),
    ("truncated image", binary_image(bytes_tensor(PNG[:40])), 400, "corrupt or truncated"),
    ("BYTES length past the end", binary_image(struct.pack("<I", 99) + b"abcd"), 400, "runs past its tensor's data"),
    ("two elements for [1]", binary_image(bytes_tensor(PNG, PNG)), 400, "its binary data has 2"),
    ("binary size past the body", binary_image(bytes_tensor(PNG), size=len(PNG) + 99), 400, "runs past the end"),
    ("bytes after the tensors", binary_image(bytes_tensor(PNG), after=b"xx"), 400, "2 bytes of binary data after"),
    ("FP32 size mismatch", binary_body({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 1, 1],
                                                    "parameters": {"binary_data_size": 10}}]}, b"\0" * 10),
     400, "need 12 bytes, not 10"),
    ("unknown output", {**JSON_IMAGE, "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
    ("classification extension", {**JSON_IMAGE, "outputs": [{"name": "probabilities",
                                                            "parameters": {"classification": 2}}]}, 400, "top_k"),
    ("unknown method", {**JSON_IMAGE, "parameters": {"method": "magic"}}, 400, "method 'magic'"),
    ("top_k as a string", {**JSON_IMAGE, "parameters": {"top_k": "2"}}, 400, "must be an integer"),
    ("top_k too big", {**JSON_IMAGE, "parameters": {"top_k": 9}}, 400, "top_k must be between 1 and 3"),
    ("unknown parameter", {**JSON_IMAGE, "parameters": {"temperature": 1}}, 400, "unknown request parameter"),
    ("not JSON", (b"{inputs", {}), 400, "not valid JSON"),
    ("lone surrogate in the id", {**JSON_IMAGE, "id": "\ud800"}, 400, "not valid Unicode"),
    ("bad header length", (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}), 400, "must be between"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_tensors_get_the_protocol_error_body(server: str, case: str, body: Any, status: int, message: str) -> None:
    content, headers = body if isinstance(body, tuple) else (json.dumps(body).encode(), {})
    r = httpx.post(f"{server}/v2/models/tiny/infer", content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()
    assert list(error) == ["error"] and isinstance(error["error"], str)
    assert message in error["error"], error


def test_errors_through_the_clients(server: str) -> None:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    tensor = triton.InferInput("pixels", [1, 3, 2, 2], "FP32")
    tensor.set_data_from_numpy(np.full((1, 3, 2, 2), 0.5, np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("nope", [tensor])
    assert caught.value.status() == "404" and "nope" in caught.value.message()
    wrong = triton.InferInput("pixels", [1, 3, 2, 2], "FP64")
    wrong.set_data_from_numpy(np.full((1, 3, 2, 2), 0.5))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("tiny", [wrong])
    assert caught.value.status() == "400" and "FP32" in caught.value.message()
    r = httpx.post(f"{server}/v2/models/tiny/infer", content=b"x", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 415 and "uncompressed" in r.json()["error"]
    r = httpx.post(f"{server}/v2/models/tiny/versions/3/infer", json=JSON_IMAGE)
    assert r.status_code == 404 and "no version '3'" in r.json()["error"]
    # a /v2 route equiserve does not have answers in the protocol's shape too: the client can print it
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_repository_index()
    assert caught.value.status() == "404" and "Not Found" in str(caught.value)
    r = httpx.get(f"{server}/v2/models/tiny/nothing")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"  # /v1 keeps its own


def test_errors_written_before_the_app_follow_the_protocol_of_the_path() -> None:
    from app.api.middleware import error_json

    v1, _ = error_json(413, "too_large", "request body over 10 bytes", "id-1")
    v2, _ = error_json(413, "too_large", "request body over 10 bytes", "id-1", v2=True)
    assert json.loads(v1) == {
        "error": {"code": "too_large", "message": "request body over 10 bytes", "request_id": "id-1"}
    }
    assert json.loads(v2) == {"error": "request body over 10 bytes"}


# -- with a stand-in engine (no model to load): the engine's refusals, and generate ----------------


class StubEngine:
    """Serves one model ``name`` of ``card["task"]``: answers every request with ``answer``
    (raised if an exception) and keeps the requests it got."""

    def __init__(self, name: str, card: dict[str, Any], answer: Any) -> None:
        self.answer, self.ready, self.draining, self.requests = answer, True, False, []
        self.metrics = Metrics(4)
        self.models = {name: SimpleNamespace(task=card["task"], card=lambda: card, limits=None)}

    def model(self, name: str) -> Any:
        if name not in self.models:
            raise ModelNotFound(f"model {name!r} is not served")
        return self.models[name]

    async def infer(self, name: str, task: str, request: Any, *, request_id: str = "") -> Any:
        self.requests.append(await request() if callable(request) else request)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@asynccontextmanager
async def stub_client(engine: StubEngine, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()  # built like create_app, without the lifespan that would load models
    app.state.settings, app.state.engine = make_settings(Path("."), **settings), engine
    app.include_router(build_v2_router())
    app.add_middleware(RequestContextMiddleware, max_body_bytes=1 << 20, body_timeout_s=30,
                       metrics=engine.metrics, served_models=lambda: set(engine.models))  # fmt: skip
    install_error_handlers(app)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


CLASSIFY_CARD = {"task": "classify", "zero_shot": False, "num_labels": 3, "transforms": TRANSFORMS}


@pytest.mark.parametrize(
    ("error", "status"),
    [(QueueFull("queue full", retry_after_s=3), 429), (NotReady("draining"), 503), (DeadlineExceeded("late"), 504)],
)
async def test_engine_refusals_keep_their_status(error: Exception, status: int) -> None:
    engine = StubEngine("tiny", CLASSIFY_CARD, error)
    async with stub_client(engine) as client:
        r = await client.post("/v2/models/tiny/infer", json=JSON_IMAGE)
        assert r.status_code == status and r.json() == {"error": str(error)}
        if status == 429:
            assert r.headers["retry-after"] == "3"
        engine.ready = False
        r = await client.get("/v2/models/tiny/ready")
        assert r.status_code == 503 and "loading" in r.json()["error"]


async def test_the_api_key_guards_inference_only() -> None:
    engine = StubEngine("tiny", CLASSIFY_CARD, NotReady("stop here"))
    async with stub_client(engine, api_key="s3cret") as client:
        r = await client.post("/v2/models/tiny/infer", json=JSON_IMAGE)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and list(r.json()) == ["error"]
        assert not engine.requests
        r = await client.post("/v2/models/tiny/infer", json=JSON_IMAGE, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 503 and len(engine.requests) == 1
        assert (await client.get("/v2/models/tiny")).status_code == 200


async def test_zero_shot_models_take_labels() -> None:
    engine = StubEngine("clip", {**CLASSIFY_CARD, "zero_shot": True, "num_labels": None}, NotReady("stop here"))
    async with stub_client(engine) as client:
        meta = (await client.get("/v2/models/clip")).json()
        assert {"name": "labels", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
        assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]}
        labels = {"name": "labels", "datatype": "BYTES", "shape": [2], "data": ["a cat", "a dog"]}
        r = await client.post("/v2/models/clip/infer", json={"inputs": [*JSON_IMAGE["inputs"], labels],
                                                             "outputs": [{"name": "lambda"}]})  # fmt: skip
        assert r.status_code == 503
        (request,) = engine.requests
        assert request.labels == ["a cat", "a dog"] and request.images[0].data == PNG
        assert not request.probabilities  # not asked for: the model does not return them


async def test_generate_text_input_to_text_output() -> None:
    swaps = ["identity", "swap:man<->woman"]
    output = GenerateOutput(
        model="tinylm", method=Method.LAMBDA, group="gender", relaxed=False, text=" a nurse", tokens=[],
        finish_reason="length",
        transforms=[TransformWeight("identity", 0.75, "The woman worked as ☕"),
                    TransformWeight("swap:man<->woman", 0.25, "The man worked as ☕")],
        selected_transform=None, lambda_net_entropy=0.56, frame="identity", seed=3, temperature=0.0, top_k=0,
        usage=Usage(4, 0), timing=Timing(0, 0, 1),
    )  # fmt: skip
    engine = StubEngine("tinylm", {"task": "generate", "transforms": swaps}, output)
    async with stub_client(engine) as client:
        meta = (await client.get("/v2/models/tinylm")).json()
        assert meta["platform"] == "equiserve_generate"
        assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
        assert [o["name"] for o in meta["outputs"]] == ["text_output", "lambda", "finish_reason"]

        prompt = "The woman worked as ☕"
        options = {"method": "lambda", "max_new_tokens": 5, "temperature": 0, "seed": 3, "relaxed": True, "top_k": 2}
        header = {"parameters": {**options, "binary_data_output": True},
                  "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                              "parameters": {"binary_data_size": 4 + len(prompt.encode())}}]}  # fmt: skip
        content, headers = binary_body(header, bytes_tensor(prompt.encode()))
        r = await client.post("/v2/models/tinylm/infer", content=content, headers=headers)
        assert r.status_code == 200, r.text
        assert engine.requests[-1] == GenerateRequest(prompt, 5, "lambda", 0.0, 2, 3, True)
        answer = triton.InferResult.from_response_body(r.content, header_length=int(r.headers[HEADER]))
        assert answer.as_numpy("text_output").tolist() == [b" a nurse"]
        assert answer.as_numpy("finish_reason").tolist() == [b"length"]
        np.testing.assert_array_equal(answer.as_numpy("lambda"), [[0.75, 0.25]])

        body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
                "outputs": [{"name": "text_output"}]}  # fmt: skip
        r = await client.post("/v2/models/tinylm/infer", json=body)
        assert r.json()["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [1], "data": [" a nurse"]}]
        assert engine.requests[-1] == GenerateRequest(prompt)

        for bad, message in [
            ({**body, "parameters": {"temperature": "hot"}}, "'temperature' must be a number"),
            ({**body, "parameters": {"relaxed": 1}}, "'relaxed' must be true/false"),
            ({"inputs": [{**body["inputs"][0], "shape": [2], "data": [prompt, prompt]}]}, "must have shape [1]"),
        ]:
            r = await client.post("/v2/models/tinylm/infer", json=bad)
            assert r.status_code == 400 and message in r.json()["error"], r.text


def test_v2_inference_is_counted_and_health_reads_as_the_protocol_says(server: str) -> None:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(png_bytes(image(3))).decode()]}],
            "parameters": {"binary_data_output": False}}  # fmt: skip
    before = httpx.get(f"{server}/metrics").text
    assert httpx.post(f"{server}/v2/models/tiny/infer", json=body).status_code == 200
    assert httpx.post(f"{server}/v2/models/nope/versions/1/infer", json=body).status_code == 404
    after = httpx.get(f"{server}/metrics").text

    def count(text: str, labels: str) -> float:
        line = next((x for x in text.splitlines() if x.startswith(f"equiserve_requests_total{{{labels}}}")), None)
        return float(line.split()[-1]) if line else 0.0

    ok = 'endpoint="infer",model="tiny",status="200"'
    assert count(after, ok) == count(before, ok) + 1
    assert count(after, 'endpoint="infer",model="unknown",status="404"') >= 1
    assert httpx.get(f"{server}/v2/health/live").json() == {"status": "ok", "live": True}
    assert httpx.get(f"{server}/v2/health/ready").json() == {"status": "ok", "ready": True}

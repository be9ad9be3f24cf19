"""The Open Inference Protocol over gRPC with tritonclient.grpc against a real `python -m app serve
--grpc-port`: health, reflection, metadata, answers equal to REST's (BYTES files and raw FP32
pixels, raw and typed contents), concurrent calls, every error status, the API key as metadata,
the queue (full, deadlines, a cancelled call's item dropped), and the drain on SIGTERM."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.apptools import ServerProcess, free_port, start_server, wait_ready
from tests.grpctools import triton_grpc
from tests.imagetools import TINY_LABELS, jpeg_bytes, png_bytes, write_tiny_model

pytestmark = pytest.mark.slow

KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_BODY = 200_000  # bytes: a 1x3x160x160 FP32 tensor is over it
InferInput = triton_grpc.InferInput
RequestedOutput = triton_grpc.InferRequestedOutput
Failure = triton_grpc.InferenceServerException


class Server:
    def __init__(self, process: ServerProcess, port: int, grpc_port: int) -> None:
        self.process, self.base, self.target = process, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"

    def client(self) -> Any:
        return triton_grpc.InferenceServerClient(self.target)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def grpc_requests(self, status: int) -> float:
        key = ("equiserve_requests_total", (("endpoint", "grpc_infer"), ("model", "tiny"), ("status", str(status))))
        return self.metrics().get(key, 0.0)

    def batched_items(self) -> float:
        return self.metrics().get(("equiserve_batch_size_sum", (("model", "tiny"),)), 0.0)


@contextmanager
def serving(models: Path, *extra: str) -> Iterator[Server]:
    port, grpc_port = free_port(), free_port()
    with start_server(models, port, "--grpc-port", str(grpc_port), "--no-warmup", *extra) as process:
        wait_ready(f"http://127.0.0.1:{port}", process)
        yield Server(process, port, grpc_port)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("grpc-models")
    write_tiny_model(folder)
    return folder


@pytest.fixture(scope="module")
def server(models: Path) -> Iterator[Server]:
    """An API key, a small body limit, batches of up to 4 images."""
    with serving(models, "--api-key", KEY, "--max-body-bytes", str(MAX_BODY), "--max-batch-size", "4",
                 "--classify-max-images", "4") as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def held(models: Path) -> Iterator[Server]:
    """A queue of 3 whose batches wait 2.5 s for a request on its way, and a 1.5 s deadline."""
    with serving(models, "--queue-size", "3", "--max-wait-ms", "2500", "--request-timeout-s", "1.5") as running:
        yield running


def image(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def pixels_of(*arrays: np.ndarray) -> np.ndarray:
    return np.stack([a.astype(np.float32).transpose(2, 0, 1) / 255 for a in arrays])


def files_input(files: list[bytes]) -> Any:
    tensor = InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object))
    return tensor


def pixels_input(pixels: np.ndarray, datatype: str = "FP32") -> Any:
    tensor = InferInput("pixels", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels)
    return tensor


def rest_v2(server: Server, name: str, datatype: str, data: np.ndarray, method: str) -> dict[str, np.ndarray]:
    """The same tensor through REST /v2 with JSON data (files as base64)."""
    import base64

    values = [base64.b64encode(e).decode() for e in data] if datatype == "BYTES" else data.ravel().tolist()
    body = {"parameters": {"method": method, "top_k": 3},
            "inputs": [{"name": name, "datatype": datatype, "shape": list(data.shape), "data": values}]}  # fmt: skip
    r = httpx.post(f"{server.base}/v2/models/tiny/infer", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def rest_v1(server: Server, files: list[bytes], method: str) -> list[dict[str, Any]]:
    r = httpx.post(f"{server.base}/v1/models/tiny/classify", headers=AUTH, timeout=60, data={"method": method},
                   files=[("image", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)])  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["results"]


def assert_same_answer(grpc_answer: Any, rest: dict[str, np.ndarray]) -> None:
    for name in ("probabilities", "lambda"):
        np.testing.assert_allclose(grpc_answer.as_numpy(name), rest[name].astype(np.float32), rtol=0, atol=1e-6)
    for name in ("copy_top_index", "top_index"):
        assert grpc_answer.as_numpy(name).tolist() == rest[name].tolist()
    assert [[e.decode() for e in row] for row in grpc_answer.as_numpy("top_label")] == rest["top_label"].tolist()


def status_of(call: Any) -> str:
    with pytest.raises(Failure) as caught:
        call()
    return caught.value.status()


# -- health, reflection, metadata ---------------------------------------------------------------


def test_health_and_readiness(server: Server) -> None:
    client = server.client()
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert status_of(lambda: client.is_model_ready("nope")) == str(grpc.StatusCode.NOT_FOUND)
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "tiny"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_reflection_lists_the_services(server: Server) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        infer = database.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert "ModelInfer" in [m.name for s in infer.service for m in s.method]


def test_metadata_equals_rest(server: Server) -> None:
    client = server.client()
    meta = client.get_server_metadata(as_json=True)
    rest = httpx.get(f"{server.base}/v2", timeout=10).json()
    assert meta == {"name": "equiserve", "version": rest["version"], "extensions": rest["extensions"]}

    model = client.get_model_metadata("tiny", as_json=True)
    rest_model = httpx.get(f"{server.base}/v2/models/tiny", timeout=10).json()
    as_ints = [{**t, "shape": [int(d) for d in t["shape"]]} for t in model["inputs"] + model["outputs"]]
    assert as_ints == rest_model["inputs"] + rest_model["outputs"]  # protobuf's JSON writes int64 as strings
    assert (model["name"], model["versions"], model["platform"]) == ("tiny", ["1"], "equiserve_classify")
    assert client.get_model_metadata("tiny", "1", as_json=True) == model
    for call in (lambda: client.get_model_metadata("nope"), lambda: client.get_model_metadata("tiny", "2")):
        assert status_of(call) == str(grpc.StatusCode.NOT_FOUND)


# -- answers equal to REST -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lambda", "equizero"])
def test_bytes_image_answers_as_rest(server: Server, method: str) -> None:
    files = [png_bytes(image(1)), jpeg_bytes(image(2, 64, 48))]
    answer = server.client().infer("tiny", [files_input(files)], request_id="g-7", headers=AUTH,
                                   parameters={"method": method, "top_k": 3})  # fmt: skip
    response = answer.get_response()
    assert (response.id, response.model_name, response.model_version) == ("g-7", "tiny", "1")
    names = [o.name for o in response.outputs]
    assert names == ["probabilities", "lambda", "copy_top_index", "top_index", "top_probability", "top_label"]
    assert len(response.raw_output_contents) == len(names)  # binary, as Triton answers
    assert_same_answer(answer, rest_v2(server, "image", "BYTES", np.array(files, dtype=object), method))
    # and /v1's multipart form: the same probabilities
    for row, result in enumerate(rest_v1(server, files, method)):
        scores = {p["index"]: p["score"] for p in result["predictions"]}
        expected = [scores[i] for i in range(len(TINY_LABELS))]
        np.testing.assert_allclose(answer.as_numpy("probabilities")[row], expected, rtol=0, atol=1e-6)


def test_raw_fp32_pixels_answer_as_rest(server: Server) -> None:
    pixels = pixels_of(image(3, 32, 32), image(4, 36, 44)[:32, :32])
    outputs = [RequestedOutput(name) for name in ("top_label", "probabilities", "lambda", "copy_top_index",
                                                  "top_index")]  # fmt: skip
    answer = server.client().infer("tiny", [pixels_input(pixels)], outputs=outputs, headers=AUTH,
                                   parameters={"method": "lambda", "top_k": 3})  # fmt: skip
    assert [o.name for o in answer.get_response().outputs] == [o.name() for o in outputs]  # the order asked
    assert_same_answer(answer, rest_v2(server, "pixels", "FP32", pixels, "lambda"))


def test_typed_contents_answer_as_raw(server: Server) -> None:
    """``contents.fp32_contents`` / ``bytes_contents`` instead of raw: tritonclient always sends raw,
    so the request is built from its protobuf modules."""
    service_pb2 = triton_grpc.service_pb2
    pixels = pixels_of(image(5, 32, 32))
    file = png_bytes(image(6))
    with grpc.insecure_channel(server.target) as channel:
        stub = triton_grpc.service_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = tuple(AUTH.items())
        typed = service_pb2.ModelInferRequest(model_name="tiny")
        typed.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape)).contents.fp32_contents.extend(
            pixels.ravel().tolist()
        )
        typed_answer = stub.ModelInfer(typed, metadata=metadata, timeout=60)
        files = service_pb2.ModelInferRequest(model_name="tiny")
        files.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(file)
        files_answer = stub.ModelInfer(files, metadata=metadata, timeout=60)
        wrong = service_pb2.ModelInferRequest(model_name="tiny")
        wrong.inputs.add(name="pixels", datatype="FP32", shape=[1]).contents.fp64_contents.append(0.5)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(wrong, metadata=metadata, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fp32_contents" in caught.value.details()
    raw = server.client().infer("tiny", [pixels_input(pixels)], headers=AUTH)
    probabilities = np.frombuffer(typed_answer.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(probabilities, raw.as_numpy("probabilities").ravel())
    from_file = server.client().infer("tiny", [files_input([file])], headers=AUTH)
    np.testing.assert_array_equal(np.frombuffer(files_answer.raw_output_contents[0], np.float32),
                                  from_file.as_numpy("probabilities").ravel())  # fmt: skip


def test_concurrent_calls_each_get_their_own_answer(server: Server) -> None:
    files = [png_bytes(image(10 + i)) for i in range(12)]
    alone = [server.client().infer("tiny", [files_input([f])], headers=AUTH).as_numpy("probabilities") for f in files]
    client = server.client()  # one channel, many calls at once: batched together by the engine
    before = server.metrics().get(("equiserve_batch_size_count", (("model", "tiny"),)), 0.0)
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda f: client.infer("tiny", [files_input([f])], headers=AUTH), files))
    for answer, expected in zip(together, alone, strict=True):
        np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, rtol=0, atol=1e-6)
    batches = server.metrics()[("equiserve_batch_size_count", (("model", "tiny"),))] - before
    assert 1 <= batches <= 12
    assert server.grpc_requests(200) >= 24


# -- errors --------------------------------------------------------------------------------------


def test_invalid_input_is_invalid_argument(server: Server) -> None:
    client = server.client()
    invalid = str(grpc.StatusCode.INVALID_ARGUMENT)
    cases = {
        "must be FP32": lambda: client.infer("tiny", [pixels_input(np.zeros((1, 3, 8, 8)), "FP64")], headers=AUTH),
        "unknown output": lambda: client.infer("tiny", [files_input([png_bytes(image(1))])], headers=AUTH,
                                               outputs=[RequestedOutput("nope")]),
        "not served by tiny": lambda: client.infer("tiny", [files_input([png_bytes(image(1))])], headers=AUTH,
                                               parameters={"method": "nope"}),
        "image": lambda: client.infer("tiny", [files_input([b"not an image"])], headers=AUTH),
        "4": lambda: client.infer("tiny", [files_input([png_bytes(image(1))] * 5)], headers=AUTH),  # over max_images
    }  # fmt: skip
    for words, call in cases.items():
        with pytest.raises(Failure) as caught:
            call()
        assert caught.value.status() == invalid and words in caught.value.message(), (words, caught.value)
    assert server.grpc_requests(400) >= len(cases)


def test_unknown_model_and_version_are_not_found(server: Server) -> None:
    client = server.client()
    tensor = files_input([png_bytes(image(1))])
    assert status_of(lambda: client.infer("nope", [tensor], headers=AUTH)) == str(grpc.StatusCode.NOT_FOUND)
    assert status_of(lambda: client.infer("tiny", [tensor], "2", headers=AUTH)) == str(grpc.StatusCode.NOT_FOUND)


def test_the_api_key_is_authorization_metadata(server: Server) -> None:
    client = server.client()
    tensor = files_input([png_bytes(image(1))])
    unauthenticated = str(grpc.StatusCode.UNAUTHENTICATED)
    assert status_of(lambda: client.infer("tiny", [tensor])) == unauthenticated
    assert status_of(lambda: client.infer("tiny", [tensor], headers={"authorization": "Bearer wrong"})) == (
        unauthenticated
    )
    assert status_of(lambda: client.infer("tiny", [tensor], headers={"authorization": KEY})) == unauthenticated
    assert client.infer("tiny", [tensor], headers=AUTH).as_numpy("probabilities").shape == (1, len(TINY_LABELS))
    assert client.is_server_ready() and client.get_model_metadata("tiny")  # as REST: only inference needs it
    assert server.grpc_requests(401) >= 3


def test_a_message_over_the_body_limit_is_refused(server: Server) -> None:
    big = np.zeros((1, 3, 160, 160), np.float32)  # 307 KB > MAX_BODY
    client = server.client()
    assert status_of(lambda: client.infer("tiny", [pixels_input(big)], headers=AUTH)) == str(
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    small = np.zeros((1, 3, 100, 100), np.float32)  # 120 KB: under it
    assert client.infer("tiny", [pixels_input(small)], headers=AUTH).as_numpy("lambda").shape == (1, 4)


# -- the queue: full, deadlines, cancelled calls --------------------------------------------------


@contextmanager
def batch_held(server: Server, seconds: float = 3.0) -> Iterator[None]:
    """A REST upload on its way for ``seconds`` makes the next batch wait its whole 2.5 s timer; it
    is no image, so it never joins a batch itself (and does not change the batch metrics)."""

    def body() -> Iterator[bytes]:
        yield b'{"images": [{"b64": "'
        time.sleep(seconds)
        yield b'AAAA"}]}'

    def upload() -> None:
        httpx.post(f"{server.base}/v1/models/tiny/classify", content=body(), timeout=30,
                   headers={"content-type": "application/json"})  # fmt: skip

    thread = threading.Thread(target=upload)
    thread.start()
    time.sleep(0.3)  # announced
    try:
        yield
    finally:
        thread.join()


class Answers:
    """Callbacks of tritonclient's async_infer, as (result, error) per call."""

    def __init__(self) -> None:
        self.done: dict[str, tuple[Any, Any]] = {}
        self.event = threading.Condition()

    def callback(self, name: str) -> Any:
        def record(result: Any, error: Any) -> None:
            with self.event:
                self.done[name] = (result, error)
                self.event.notify_all()

        return record

    def wait(self, *names: str, timeout: float = 30) -> None:
        with self.event:
            assert self.event.wait_for(lambda: all(n in self.done for n in names), timeout), self.done


def wait_idle(server: Server) -> None:
    deadline = time.monotonic() + 20
    while server.metrics().get(("equiserve_inflight_requests", ()), 1.0) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)


def test_queue_full_then_the_server_deadline(held: Server) -> None:
    client = held.client()
    tensor = files_input([png_bytes(image(1))])
    wait_idle(held)
    batched, answers = held.batched_items(), Answers()
    with batch_held(held):
        for name in "abc":  # the queue holds 3
            client.async_infer("tiny", [tensor], answers.callback(name))
        time.sleep(0.3)
        full = status_of(lambda: client.infer("tiny", [tensor]))
        assert full == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
        answers.wait("a", "b", "c")  # each waited past its 1.5 s deadline for the held batch
    for name in "abc":
        result, error = answers.done[name]
        assert result is None and error.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED), error
    assert held.batched_items() == batched  # none of them reached the model
    assert client.infer("tiny", [tensor]).as_numpy("probabilities").shape == (1, 3)  # the queue is free again
    assert held.grpc_requests(429) >= 1 and held.grpc_requests(504) >= 3


def test_a_cancelled_call_is_dropped_and_frees_its_slot(held: Server) -> None:
    client = held.client()
    tensor = files_input([png_bytes(image(1))])
    wait_idle(held)
    batched, cancelled_before, answers = held.batched_items(), held.grpc_requests(499), Answers()
    with batch_held(held, seconds=1.0):
        calls = [client.async_infer("tiny", [tensor], answers.callback(name)) for name in "abc"]
        time.sleep(0.2)
        assert status_of(lambda: client.infer("tiny", [tensor])) == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
        calls[1].cancel()  # the client gives up on b while it is queued
        time.sleep(0.3)
        # The engine dropped it: the calls queued after it fit (the slot is free once the held
        # batch is taken, which is where the engine drops a cancelled item, as a REST disconnect's).
    answers.wait("a", "b", "c")
    assert answers.done["b"][1].status() == str(grpc.StatusCode.CANCELLED)
    deadline = time.monotonic() + 10
    while held.grpc_requests(499) == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert held.grpc_requests(499) == cancelled_before + 1
    wait_idle(held)
    ran = held.batched_items() - batched
    answered = [name for name in "ac" if answers.done[name][0] is not None]
    assert ran == len(answered), (ran, answers.done)  # b never reached the model
    more = [client.infer("tiny", [tensor]) for _ in range(3)]  # the whole queue is free
    assert len(more) == 3


def test_the_client_deadline_cancels_the_call(held: Server) -> None:
    client = held.client()
    tensor = files_input([png_bytes(image(1))])
    wait_idle(held)
    batched = held.batched_items()
    with batch_held(held, seconds=1.5):
        started = time.monotonic()
        status = status_of(lambda: client.infer("tiny", [tensor], client_timeout=0.4))
        assert status == str(grpc.StatusCode.DEADLINE_EXCEEDED) and time.monotonic() - started < 1.2
    wait_idle(held)
    time.sleep(2.6)  # past the batch timer: nothing ran for it
    assert held.batched_items() == batched


# -- drain ---------------------------------------------------------------------------------------


def test_sigterm_drains_grpc_calls(models: Path) -> None:
    with serving(models, "--max-wait-ms", "2500", "--max-batch-size", "64") as running:
        client = running.client()
        tensor = files_input([png_bytes(image(1))])
        answers = Answers()
        with batch_held(running):
            for name in "abcd":
                client.async_infer("tiny", [tensor], answers.callback(name))
            time.sleep(0.4)  # all four queued, waiting for the held batch
            running.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert not client.is_server_ready()
            with grpc.insecure_channel(running.target) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert status_of(lambda: client.infer("tiny", [tensor])) == str(grpc.StatusCode.UNAVAILABLE)
            assert not client.is_model_ready("tiny")
            answers.wait("a", "b", "c", "d")
        for name in "abcd":
            result, error = answers.done[name]
            assert error is None and result.as_numpy("probabilities").shape == (1, 3), error
        assert running.process.wait(timeout=60) == 0, running.process.output()
        output = running.process.output()
        assert re.search(r"gRPC: stopped", output) and "stopped: every accepted request was answered" in output

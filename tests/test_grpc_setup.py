"""The gRPC front without a server: the vendored modules are what the script generates, the
flag and the extra, and how a ModelInferRequest is read into the REST body's tensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.cli import build_parser, main
from app.errors import InvalidTensor
from app.serving import settings_from_args

ROOT = Path(__file__).resolve().parent.parent


def test_the_vendored_modules_are_what_the_script_generates() -> None:
    check = subprocess.run([sys.executable, "-m", "app.api.oip_grpc.generate", "--check"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "up to date" in check.stdout


def test_the_check_fails_on_a_stale_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.api.oip_grpc import generate

    for name in generate.GENERATED:
        (tmp_path / name).write_bytes((generate.HERE / name).read_bytes())
    (tmp_path / generate.GENERATED[0]).write_text("# edited by hand\n")
    monkeypatch.setattr(generate, "HERE", tmp_path)  # where the vendored files are looked for
    assert generate.differences() == [generate.GENERATED[0]]
    assert generate.main(["--check"]) == 1


def test_the_messages_have_a_pool_of_their_own() -> None:
    """So that tritonclient.grpc or the KServe SDK (same message names, protobuf's default pool) can
    share the process."""
    from google.protobuf import descriptor_pool

    from app.api.oip_grpc import open_inference_grpc_pb2 as pb

    assert pb.DESCRIPTOR.pool is pb.POOL and pb.POOL is not descriptor_pool.Default()
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindFileByName(pb.DESCRIPTOR.name)


def test_the_grpc_port_is_a_flag_and_off_by_default() -> None:
    assert settings_from_args(build_parser().parse_args(["serve"])).grpc_port == 0
    assert settings_from_args(build_parser().parse_args(["serve", "--grpc-port", "8001"])).grpc_port == 8001


def test_serving_grpc_without_the_extra_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc_health", None)  # what importlib sees where it is not installed
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--grpc-port", "8001", "--models-dir", str(tmp_path)])
    message = str(exit_.value.code)
    assert "needs the 'grpc' extra (grpc_health is not installed)" in message and "\n" not in message
    assert "pip install -e '.[grpc]'" in message


def test_grpc_is_refused_with_ray(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--ray", "--grpc-port", "8001", "--models-dir", str(tmp_path)])
    assert "--grpc-port is not served with --ray" in str(exit_.value.code)


# -- a ModelInferRequest read as a REST body -----------------------------------------------------


def infer_request(**fields: object) -> object:
    from app.api.oip_grpc import open_inference_grpc_pb2 as pb

    return pb.ModelInferRequest(model_name="m", **fields)


def test_raw_and_typed_contents_become_the_same_tensors() -> None:
    from app.api.grpc_service import request_body
    from app.oip import bytes_payload

    pixels = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2) / 12
    files = [b"\x89PNG first", b"second"]
    raw = infer_request(raw_input_contents=[pixels.tobytes(), bytes_payload(files)])
    raw.inputs.add(name="pixels", datatype="FP32", shape=[1, 3, 2, 2])
    raw.inputs.add(name="image", datatype="BYTES", shape=[2])
    typed = infer_request()
    typed.inputs.add(name="pixels", datatype="FP32", shape=[1, 3, 2, 2]).contents.fp32_contents.extend(pixels.ravel())
    typed.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(files)
    for request in (raw, typed):
        body = request_body(request)
        np.testing.assert_array_equal(body.inputs["pixels"].data, pixels)
        assert body.inputs["image"].data.tolist() == files and body.inputs["image"].binary
        assert body.outputs is None and body.parameters == {} and body.id is None


def test_parameters_ids_and_outputs_are_read() -> None:
    from app.api.grpc_service import request_body

    request = infer_request(id="r-1", raw_input_contents=[np.int64(3).tobytes()])
    request.inputs.add(name="k", datatype="INT64", shape=[1])
    request.parameters["method"].string_param = "lambda"
    request.parameters["top_k"].int64_param = 2
    request.parameters["temperature"].double_param = 0.5
    request.parameters["relaxed"].bool_param = True
    request.outputs.add(name="lambda")
    body = request_body(request)
    assert body.id == "r-1" and body.inputs["k"].data.tolist() == [3]
    assert body.parameters == {"method": "lambda", "top_k": 2, "temperature": 0.5, "relaxed": True}
    assert [o.name for o in body.outputs or []] == ["lambda"]


def parameter(**value: object) -> object:
    from app.api.oip_grpc import open_inference_grpc_pb2 as pb

    return pb.InferParameter(**value)


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda r: r.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(300),
         "out of range for INT8"),
        (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[1]).contents.int64_contents.append(1),
         "its contents go in fp32_contents"),
        (lambda r: r.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0),
         "send it in raw_input_contents"),
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1]), r.raw_input_contents.extend([b"", b""])),
         "2 raw_input_contents for 1 inputs"),
        (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[2]).contents.fp32_contents.append(1.0),
         "need 8 bytes, not 4"),
        (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[1]).parameters["shared_memory_region"]
         .MergeFrom(parameter(string_param="region")), "shared memory"),
        (lambda r: r.parameters["top_k"].Clear(), "parameter 'top_k' of the request has no value"),
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0),
                    r.outputs.add(name="y").parameters["classification"].MergeFrom(parameter(int64_param=2))),
         "classification"),
    ],
)  # fmt: skip
def test_bad_requests_are_invalid_tensors(build: object, words: str) -> None:
    from app.api.grpc_service import request_body

    request = infer_request()
    build(request)  # type: ignore[operator]
    with pytest.raises(InvalidTensor) as caught:
        request_body(request)
    assert words in caught.value.message

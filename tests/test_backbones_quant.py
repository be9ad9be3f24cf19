"""int8 backbones (onnxruntime static QDQ quantization): cached under their own key, calibrated
on real images, close to float32, and invariant up to float rounding like any backbone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from app.backbones import onnx_cache, onnx_quant
from app.backbones.onnx_quant import Calibration, calibration_id, calibration_images, float_nodes
from app.backbones.onnx_runtime import OnnxBackbone
from app.config import Settings
from app.equivariance import Method
from app.repository import ModelLoadError
from app.tasks import load_model
from app.tasks.base import LoadOptions
from app.tasks.classify.model import ClassifyModel, ImageItem, SpeedOptions, _precision
from tests.imagetools import photo, write_tiny_model


def write_calibration(folder: Path, count: int = 6) -> None:
    from PIL import Image

    calib = folder / "calib"
    calib.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    source = photo("chelsea")
    for i in range(count):
        top, left = rng.integers(0, 100, 2)
        Image.fromarray(source[top : top + 160, left : left + 200]).save(calib / f"{i}.png")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quant-models")
    folder = write_tiny_model(root, "tiny")
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    write_calibration(folder)
    (folder / "model.yaml").write_text(yaml.safe_dump({**spec, "calibration": "calib"}))
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quant-cache")


def load(models_dir: Path, cache_dir: Path, precision: str, **kw: str) -> ClassifyModel:
    options = LoadOptions(
        device="cpu", runtime="onnxruntime", onnx_cache_dir=cache_dir, threads=1, precision=precision, **kw
    )
    model = load_model(models_dir, "tiny", options=options)
    assert isinstance(model, ClassifyModel)
    return model


def items(pixels: torch.Tensor, method: Method = Method.EQUITUNE) -> list[ImageItem]:
    return [ImageItem(p, method, 3) for p in pixels]


def test_precision_resolution() -> None:
    assert _precision("auto", None) == "float32"
    assert _precision("auto", "int8") == "int8"  # the model's own choice
    assert _precision("float32", "int8") == "float32"  # an explicit setting wins
    assert _precision("int8", None) == "int8"
    assert SpeedOptions.of(LoadOptions()) == SpeedOptions()
    assert SpeedOptions.of(LoadOptions(precision="int8")).precision == "int8"
    settings = Settings(
        precision="int8", input_pipeline="device", onnx_provider="cuda", onnx_spin=True, compile_mode="compile"
    )
    assert SpeedOptions.of(LoadOptions.from_settings(settings)) == SpeedOptions(
        precision="int8", onnx_provider="cuda", onnx_spin=True, input_pipeline="device", compile_mode="compile"
    )


def test_int8_graph_is_quantized_cached_and_keyed_apart(
    models_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real = onnx_cache.quantize_int8

    def counting(float_path: Path, out_path: Path, pixels: np.ndarray, **kw: str) -> Path:
        calls.append(out_path)
        return real(float_path, out_path, pixels, **kw)

    monkeypatch.setattr(onnx_cache, "quantize_int8", counting)
    int8 = load(models_dir, cache_dir, "int8")
    assert isinstance(int8.backbone, OnnxBackbone) and int8.backbone.precision == "int8"
    assert len(calls) == 1 and calls[0].name.endswith(".onnx") and "-int8-" in calls[0].name
    graph = onnx.load(str(int8.backbone.path))
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("QuantizeLinear") > 10 and "DequantizeLinear" in ops
    # the first convolution and the head stay float: their inputs are not dequantized tensors
    dequantized = {node.output[0] for node in graph.graph.node if node.op_type == "DequantizeLinear"}
    first_conv = next(node for node in graph.graph.node if node.op_type == "Conv")
    assert first_conv.input[0] not in dequantized  # pixels go in as float
    float32 = load(models_dir, cache_dir, "float32")
    assert float32.backbone.precision == "float32" and float32.backbone.path != int8.backbone.path
    again = load(models_dir, cache_dir, "int8")  # from the cache: no second quantization
    assert len(calls) == 1 and again.backbone.path == int8.backbone.path


def test_int8_is_close_to_float32_and_invariant(models_dir: Path, cache_dir: Path) -> None:
    int8, float32 = load(models_dir, cache_dir, "int8"), load(models_dir, cache_dir, "float32")
    rng = np.random.default_rng(1)
    source = photo("astronaut")
    images = [source[top : top + 200, left : left + 180] for top, left in rng.integers(0, 300, (6, 2))]
    pixels = torch.stack([int8.preprocess(np.ascontiguousarray(image)) for image in images])
    with torch.inference_mode():
        f_int8, f_float = int8.backbone.encode(pixels), float32.backbone.encode(pixels)
    cosine = torch.nn.functional.cosine_similarity(f_int8, f_float, dim=1)
    assert float(cosine.min()) > 0.95, cosine  # quantization noise, not another model
    assert not torch.equal(f_int8, f_float)  # and it is really another graph
    # invariance: every rotation of every image gets the same answer up to float rounding
    for method in (Method.EQUITUNE, Method.LAMBDA):
        reference = int8(items(pixels, method))
        for k in (1, 2, 3):
            rotated = int8(items(torch.rot90(pixels, k, (-2, -1)), method))
            for a, b in zip(reference, rotated, strict=True):
                assert not isinstance(a, BaseException) and not isinstance(b, BaseException)
                assert [p.label for p in a.predictions] == [p.label for p in b.predictions]
                np.testing.assert_allclose([p.score for p in a.predictions], [p.score for p in b.predictions],
                                           rtol=0, atol=1e-5)  # fmt: skip


def test_model_yaml_precision_and_calibration_source(models_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path, "tiny")
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    write_calibration(folder, count=3)
    (folder / "model.yaml").write_text(yaml.safe_dump({**spec, "precision": "int8", "calibration": "calib"}))
    served = load_model(tmp_path, "tiny", device="cpu", runtime="onnxruntime", onnx_cache_dir=cache_dir)
    assert isinstance(served.backbone, OnnxBackbone) and served.backbone.precision == "int8"
    outside = {**spec, "precision": "int8", "calibration": "../elsewhere"}
    (folder / "model.yaml").write_text(yaml.safe_dump(outside))
    with pytest.raises(ModelLoadError, match="calibration"):
        load_model(tmp_path, "tiny", device="cpu", runtime="onnxruntime", onnx_cache_dir=cache_dir)


def test_int8_needs_onnxruntime_and_says_so(
    models_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = LoadOptions(device="cpu", runtime="torch", onnx_cache_dir=cache_dir, precision="int8")
    with caplog.at_level(logging.WARNING):
        served = load_model(models_dir, "tiny", options=options)
    assert served.runtime == "torch" and "int8 needs onnxruntime" in caplog.text


def test_calibration_sets() -> None:
    photos = calibration_images("photos", count=5)
    assert len(photos) == 5 and all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in photos)
    assert calibration_images("photos", count=5, seed=0)[1].shape == photos[1].shape  # seeded crops
    fashion = calibration_images("fashion-mnist", count=7)
    assert len(fashion) == 7 and fashion[0].shape == (28, 28, 3)
    assert calibration_id("photos") != calibration_id("fashion-mnist") != calibration_id("photos", count=3)
    calibration = Calibration("fashion-mnist", count=2, group="c4")
    pixels = calibration.pixels(16)
    assert pixels.shape == (8, 3, 16, 16) and pixels.dtype == np.float32  # 2 images x 4 rotated copies
    np.testing.assert_array_equal(pixels[2], np.rot90(pixels[0], 1, (-2, -1)))  # the group's copies
    with pytest.raises(FileNotFoundError):
        calibration_images("/nonexistent/folder")


def test_float_nodes_are_the_first_conv_and_the_head() -> None:
    from onnx import helper

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0"),
        helper.make_node("Conv", ["a", "w1"], ["b"], name="conv1"),
        helper.make_node("Gemm", ["b", "w2"], ["c"], name="inner"),  # before the last conv: quantized
        helper.make_node("Conv", ["c", "w3"], ["d"], name="conv2"),
        helper.make_node("ReduceMean", ["d"], ["e"], name="pool"),
        helper.make_node("Gemm", ["e", "w4"], ["f"], name="head"),
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    assert float_nodes(helper.make_model(graph)) == ["conv0", "head"]
    assert onnx_quant.QUANT_CONFIG["format"] == "QDQ"

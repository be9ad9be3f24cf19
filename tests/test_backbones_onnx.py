"""ONNX export + onnxruntime serving of image backbones (random-init models, CPU provider)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from app.backbones.onnx_runtime import OnnxBackbone, export_onnx, select_providers
from app.backbones.open_clip_zero_shot import OpenClipZeroShot
from app.backbones.torchvision_cnn import TorchvisionClassifier
from app.equivariance import IMAGE_GROUPS, EquivariantModel, LambdaNet, Method, image_group

SIZE = 32  # resnet18 pools adaptively: a 32x32 input keeps export and inference fast


@pytest.fixture(scope="module")
def torch_backbone() -> TorchvisionClassifier:
    torch.manual_seed(0)
    backbone = TorchvisionClassifier("resnet18", num_classes=10)
    backbone.input_size = SIZE
    return backbone.eval()


@pytest.fixture(scope="module")
def onnx_path(torch_backbone: TorchvisionClassifier, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(torch_backbone, tmp_path_factory.mktemp("onnx") / "resnet18.onnx")  # example batch 2


@pytest.fixture(scope="module")
def onnx_backbone(onnx_path: Path) -> OnnxBackbone:
    return OnnxBackbone(onnx_path)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """ONNX kernels differ from torch's by rounding: compare relative to the outputs' scale."""
    atol = rel * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def test_metadata_roundtrip(onnx_backbone: OnnxBackbone, torch_backbone: TorchvisionClassifier) -> None:
    assert onnx_backbone.family == "onnx" and onnx_backbone.source_family == "torchvision"
    assert onnx_backbone.name == "resnet18" and onnx_backbone.input_size == SIZE
    assert onnx_backbone.feature_dim == 512 and onnx_backbone.num_classes == 10
    assert onnx_backbone.labels == torch_backbone.labels
    torch.testing.assert_close(onnx_backbone.mean, torch_backbone.mean)
    assert onnx_backbone.dtype == torch.float32 and onnx_backbone.device == torch.device("cpu")


def test_batch_axis_is_dynamic(onnx_path: Path) -> None:
    (pixels,) = onnx.load(str(onnx_path)).graph.input
    dims = pixels.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]


@pytest.mark.parametrize("batch", [1, 5])  # exported with a batch of 2
def test_matches_torch(onnx_backbone: OnnxBackbone, torch_backbone: TorchvisionClassifier, batch: int) -> None:
    x = torch.rand(batch, 3, SIZE, SIZE)
    with torch.inference_mode():
        features, logits = torch_backbone.encode(x), torch_backbone(x)
        onnx_features = onnx_backbone.encode(x)
        onnx_logits = onnx_backbone.head(onnx_features)
    assert onnx_features.shape == (batch, 512) and onnx_logits.shape == (batch, 10)
    assert_close_scaled(onnx_features, features)
    assert_close_scaled(onnx_logits, logits)
    # The head on torch's features agrees too: it is the exported Linear.
    assert_close_scaled(onnx_backbone.head(features), logits)


def test_split_sessions_equal_the_whole_graph(onnx_backbone: OnnxBackbone, onnx_path: Path) -> None:
    """encode + head run the exported nodes themselves: bit for bit the file's outputs."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, SIZE, SIZE)
    features, logits = session.run(None, {"pixels": x.numpy()})
    ours = onnx_backbone.encode(x)
    np.testing.assert_array_equal(ours.numpy(), features)
    np.testing.assert_array_equal(onnx_backbone.head(ours).numpy(), logits)


@pytest.mark.parametrize("group_name", IMAGE_GROUPS)
@pytest.mark.parametrize("method", list(Method))
def test_invariant_and_fused_equals_reference(onnx_backbone: OnnxBackbone, group_name: str, method: Method) -> None:
    group = image_group(group_name)
    torch.manual_seed(1)
    model = EquivariantModel(onnx_backbone.encode, onnx_backbone.head, group, lambda_net=LambdaNet(512)).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        out = model(x, method)
        assert out.shape == (2, 10)
        assert_close_scaled(model.reference(x, method), out, rel=1e-5)
        if method is Method.VANILLA:
            return
        for g in range(group.order):
            assert_close_scaled(model(group.act(x, g), method), out, rel=1e-5)


def test_cpu_provider(onnx_backbone: OnnxBackbone) -> None:
    assert onnx_backbone.providers == ["CPUExecutionProvider"]
    assert select_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    with torch.inference_mode():
        onnx_backbone.warmup(3)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="tests the CPU fallback")
def test_cuda_request_falls_back_to_cpu(onnx_path: Path) -> None:
    backbone = OnnxBackbone(onnx_path).to_runtime("cuda", torch.bfloat16)  # neither is available: warn, go on
    assert backbone.providers == ["CPUExecutionProvider"]
    assert backbone.device == torch.device("cpu") and backbone.dtype == torch.float32
    with torch.inference_mode():
        assert backbone(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 10)


def test_zero_shot_export_with_static_batch(tmp_path: Path) -> None:
    """A CLIP backbone exports with its default label set's text embeddings as constants."""
    torch.manual_seed(0)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    clip = OpenClipZeroShot("tiny-clip", model_cfg=cfg, default_labels=["cat", "dog", "car"])
    path = export_onnx(clip, tmp_path / "clip.onnx", batch_size_dynamic=False)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 16, 16]
    backbone = OnnxBackbone(path)
    assert backbone.labels == ["cat", "dog", "car"] and backbone.source_family == "open_clip"
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        assert_close_scaled(backbone.encode(x), clip.encode(x))
        assert_close_scaled(backbone(x), clip(x))


def test_export_refuses_low_precision(torch_backbone: TorchvisionClassifier, tmp_path: Path) -> None:
    half = copy.deepcopy(torch_backbone).to_runtime("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        export_onnx(half, tmp_path / "half.onnx")


def test_foreign_onnx_file_is_rejected(onnx_path: Path, tmp_path: Path) -> None:
    model = onnx.load(str(onnx_path))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(ValueError, match="metadata"):
        OnnxBackbone(foreign)

"""onnxruntime on the CPU through the export cache: same answers as torch, one export per
model, a new export when anything the graph depends on changes, and torch when export fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from app.backbones import onnx_cache
from app.backbones.onnx_cache import export_key, onnx_backbone
from app.backbones.onnx_runtime import OnnxBackbone
from app.backbones.torchvision_cnn import TorchvisionClassifier
from app.config import Settings
from app.repository import ModelLoadError
from app.tasks import load_model
from app.tasks.base import LoadOptions
from tests.imagetools import write_tiny_model

SIZE = 32


def tiny_backbone(seed: int = 0) -> TorchvisionClassifier:
    torch.manual_seed(seed)
    backbone = TorchvisionClassifier("resnet18", num_classes=3, input_size=SIZE)
    return backbone.to_runtime("cpu", channels_last=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def count_exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = onnx_cache.export_onnx

    def counting(backbone: object, path: Path, **kwargs: object) -> Path:
        calls.append(path)
        return real(backbone, path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_cache, "export_onnx", counting)
    return calls


def test_onnxruntime_matches_torch_and_exports_once(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exports = count_exports(monkeypatch)
    backbone = tiny_backbone()
    first = onnx_backbone(backbone, cache_dir, threads=1)
    second = onnx_backbone(tiny_backbone(), cache_dir, threads=1)  # same weights: from the cache
    assert len(exports) == 1 and isinstance(first, OnnxBackbone) and second.path == first.path
    assert [p.name for p in cache_dir.iterdir()] == [first.path.name]  # no scratch files left behind
    pixels = torch.rand(5, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected = backbone(pixels)
        for served in (first, second):
            torch.testing.assert_close(served.head(served.encode(pixels)), expected, atol=1e-4, rtol=1e-4)


def test_intra_op_spinning_is_off_unless_asked(tmp_path: Path, cache_dir: Path) -> None:
    """EQUISERVE_ONNX_SPIN reaches the session of a loaded model; by default the threads sleep."""

    def spinning(spin: bool | None) -> str:
        options = LoadOptions(device="cpu", runtime="onnxruntime", onnx_cache_dir=cache_dir)
        if spin is not None:
            options = LoadOptions.from_settings(
                Settings(models_dir=tmp_path, device="cpu", runtime="onnxruntime", onnx_spin=spin,
                         onnx_cache_dir=cache_dir)
            )  # fmt: skip
        backbone = load_model(tmp_path, "tiny", options=options).backbone
        assert isinstance(backbone, OnnxBackbone)
        return backbone.session_options.get_session_config_entry("session.intra_op.allow_spinning")

    write_tiny_model(tmp_path)
    assert (spinning(None), spinning(False), spinning(True)) == ("0", "0", "1")


def test_the_key_covers_weights_head_and_labels() -> None:
    base = tiny_backbone()
    key = export_key(base)
    assert export_key(tiny_backbone()) == key
    assert export_key(tiny_backbone(seed=1)) != key  # other trunk weights
    relabelled = tiny_backbone()
    relabelled.labels = ["x", "y", "z"]
    assert export_key(relabelled) != key
    new_head = tiny_backbone()
    new_head.replace_head(["a", "b", "c"], {k: v + 1 for k, v in base.classifier.state_dict().items()})
    new_head.labels = base.labels
    assert export_key(new_head) != key


def test_auto_runtime_serves_the_same_predictions_as_torch(tmp_path: Path, cache_dir: Path) -> None:
    write_tiny_model(tmp_path)
    torch.manual_seed(3)
    on_ort = load_model(tmp_path, "tiny", device="cpu", runtime="auto", onnx_cache_dir=cache_dir)
    torch.manual_seed(3)
    on_torch = load_model(tmp_path, "tiny", device="cpu", runtime="torch")
    assert on_ort.runtime == "onnxruntime" and on_torch.runtime == "torch"
    pixels = torch.rand(4, 3, SIZE, SIZE)
    with torch.inference_mode():
        for method in ("equitune", "equizero", "lambda"):
            expected = on_torch.model.predict(pixels, method)
            actual = on_ort.model.predict(pixels, method)
            torch.testing.assert_close(actual.output, expected.output, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(actual.weights, expected.weights, atol=1e-4, rtol=1e-4)


def test_a_failed_export_falls_back_to_torch_under_auto_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_tiny_model(tmp_path)

    def broken(*args: object, **kwargs: object) -> OnnxBackbone:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr("app.tasks.classify.model.onnx_backbone", broken)
    with caplog.at_level(logging.WARNING, logger="equiserve.classify"):
        loaded = load_model(tmp_path, "tiny", device="cpu", runtime="auto")
    assert loaded.runtime == "torch"
    assert "exporter exploded" in caplog.text and "serving with torch" in caplog.text
    with pytest.raises(ModelLoadError, match="exporter exploded"):
        load_model(tmp_path, "tiny", device="cpu", runtime="onnxruntime")


def test_explicit_onnxruntime_refuses_zero_shot_backbones(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.tasks.classify import model as registry

    backbone = tiny_backbone()
    monkeypatch.setattr(backbone, "zero_shot", True)
    assert registry._wants_onnxruntime("auto", backbone, torch.device("cpu")) is False
    assert registry._wants_onnxruntime("auto", tiny_backbone(), torch.device("cuda")) is False
    with pytest.raises(ModelLoadError, match="fixed-label"):
        registry._wants_onnxruntime("onnxruntime", backbone, torch.device("cpu"))


@pytest.mark.slow
def test_release_memory_shrinks_the_arena_and_keeps_the_answers(cache_dir: Path) -> None:
    def rss_mib() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    torch.manual_seed(0)
    backbone = TorchvisionClassifier("resnet18", num_classes=3, input_size=224).to_runtime("cpu")
    served = onnx_backbone(backbone, cache_dir, threads=1)
    probe = torch.rand(2, 3, 224, 224)
    before = served.encode(probe)
    served.encode(torch.rand(48, 3, 224, 224))  # grows onnxruntime's arena by hundreds of MiB
    grown = rss_mib()
    served.release_memory()
    assert grown - rss_mib() > 100, (grown, rss_mib())
    torch.testing.assert_close(served.encode(probe), before)  # and it still computes the same

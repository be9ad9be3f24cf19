"""The model repository: safe paths, clear errors naming the file, heads and λ-nets, devices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from app.config import DEFAULT_MODELS_DIR, Settings
from app.engine.engine import Engine
from app.repository import ModelLoadError, list_models, model_dir, resolve_device, resolve_dtype
from app.tasks import load_model
from tests.imagetools import TINY_LABELS, write_tiny_model


def test_shipped_repository_lists_and_validates() -> None:
    names = list_models(DEFAULT_MODELS_DIR)
    assert "imagenet-effnet-c4" in names and "clip-vit-b32-c4" in names


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "", "x" * 80, "..", "a b"])
def test_model_names_cannot_escape_the_repository(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelLoadError):
        model_dir(tmp_path, name)


def test_files_named_by_an_entry_cannot_escape_its_folder(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path)
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    spec["lambda_net"] = "../../outside.safetensors"
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        load_model(tmp_path, "tiny", device="cpu")


def test_symlinked_entries_and_files_are_served(tmp_path: Path) -> None:
    """An operator links an entry kept elsewhere, or weights from a download cache: both load."""
    elsewhere = write_tiny_model(tmp_path / "elsewhere")
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    (elsewhere / "lambda_net.safetensors").rename(blob)
    (elsewhere / "lambda_net.safetensors").symlink_to(blob)
    repository = tmp_path / "models"
    repository.mkdir()
    (repository / "linked").symlink_to(elsewhere, target_is_directory=True)
    assert list_models(repository) == ["linked"]
    assert model_dir(repository, "linked") == (repository / "linked").absolute()
    served = load_model(repository, "linked", device="cpu")
    assert served.card()["name"] == "linked" and served.card()["lambda_trained"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"group": "c8"}, "unknown group"),
        ({"methods": ["vanilla"], "default_method": "equitune"}, "default_method"),
        ({"surprise": 1}, "invalid"),
        ({"backbone": {"family": "nope"}}, "invalid"),
        ({"lambda_net": "missing.safetensors"}, "missing.safetensors"),
    ],
)
def test_bad_entries_fail_with_a_clear_error(tmp_path: Path, change: dict, message: str) -> None:
    folder = write_tiny_model(tmp_path)
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    (folder / "model.yaml").write_text(yaml.safe_dump({**spec, **change}))
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path, "tiny", device="cpu")


def test_invalid_yaml_and_corrupt_weights_name_the_file(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path)
    (folder / "lambda_net.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelLoadError, match=r"lambda_net\.safetensors"):
        load_model(tmp_path, "tiny", device="cpu")
    (folder / "model.yaml").write_text("group: [unclosed")
    with pytest.raises(ModelLoadError, match=r"model\.yaml"):
        load_model(tmp_path, "tiny", device="cpu")


def test_a_lambda_net_that_does_not_fit_the_backbone_is_refused(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path)
    from app.equivariance import LambdaNet

    save_file(LambdaNet(17).state_dict(), str(folder / "lambda_net.safetensors"))
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_model(tmp_path, "tiny", device="cpu")


def test_head_and_labels_files_are_loaded(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path, trained_lambda=False)
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    head = torch.nn.Linear(512, 2)
    save_file(head.state_dict(), str(folder / "head.safetensors"))
    (folder / "labels.txt").write_text("yes\nno\n")
    spec.update(head="head.safetensors", labels="labels.txt")
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_model(tmp_path, "tiny", device="cpu")
    assert loaded.backbone.labels == ["yes", "no"]
    assert torch.equal(loaded.backbone.classifier.weight, head.weight)
    assert not loaded.lambda_trained
    # an untrained λ-net is uniform: λ-equitune == equitune
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x, "lambda"), loaded.model(x, "equitune"))


def test_trained_lambda_net_is_loaded(tmp_path: Path) -> None:
    write_tiny_model(tmp_path)
    loaded = load_model(tmp_path, "tiny", device="cpu")
    assert loaded.lambda_trained and loaded.backbone.labels == TINY_LABELS
    assert loaded.model.lambda_net is not None
    assert loaded.model.lambda_net.mlp[0].weight.abs().sum() > 0


def test_cuda_request_falls_back_to_cpu_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("cuda").type == "cpu"
    assert resolve_device("auto").type == "cpu"
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16


def test_optional_models_needing_a_download_are_skipped_unless_named(tmp_path: Path) -> None:
    write_tiny_model(tmp_path)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "model.yaml").write_text(yaml.safe_dump({
        "optional": True, "group": "c4",
        "backbone": {"family": "open_clip", "options": {"model_name": "ViT-B-32", "pretrained": "openai"}},
    }))  # fmt: skip
    engine = Engine(Settings(models_dir=tmp_path, device="cpu", warmup=False))
    engine.load()
    assert list(engine.models) == ["tiny"]


def test_torch_threads_setting_applies(tmp_path: Path) -> None:
    write_tiny_model(tmp_path)
    before = torch.get_num_threads()
    try:
        Engine(Settings(models_dir=tmp_path, device="cpu", warmup=False, torch_threads=1)).load()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

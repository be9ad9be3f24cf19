"""`python -m app train` / `evaluate` end to end: the written entry is what the server loads,
bit for bit, and nothing on the way is unpickled."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from app.backbones.datasets import fashion_mnist
from app.cli import main
from app.equivariance import EquivariantModel, Method, image_group
from app.tasks import load_model
from app.tasks.classify.training.pipeline import TrainJob, train_job
from app.tasks.classify.training.trainer import TrainConfig

TINY = {"pretrained": False, "input_size": 32}


def tiny_job(tmp_path: Path, **overrides: Any) -> TrainJob:
    config = overrides.pop("config", TrainConfig(epochs=2, patience=2, batch_size=32, progress=False))
    return TrainJob(
        name=overrides.pop("name", "fm"),
        models_dir=tmp_path / "models",
        options=dict(TINY),
        train_size=64,
        val_size=32,
        config=config,
        cache_dir=tmp_path / "cache",
        **overrides,
    )


def assert_same_outputs(outcome: Any, models_dir: Path, name: str, group: str) -> None:
    """The served entry's outputs equal the in-memory trained model's, bit for bit, for every method."""
    # training ran channels_last (fast on the CPU), as serving does by default; the same
    # layout on both sides makes the same kernels run, so outputs agree bit for bit
    loaded = load_model(models_dir, name, device="cpu", channels_last=True)
    backbone = outcome.backbone
    assert backbone.channels_last
    trained = EquivariantModel(backbone.encode, backbone.head, image_group(group), lambda_net=outcome.lambda_net)
    x = fashion_mnist("test").subset(range(3)).pixels(range(3), 32)
    with torch.inference_mode():
        ours, theirs = trained.eval().copies(x), loaded.model.copies(x)
        for method in Method:
            assert torch.equal(trained.combine(ours, method).output, loaded.model.combine(theirs, method).output)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something tried to unpickle a file")

    for owner, attr in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, attr, refuse)


def test_train_writes_an_entry_the_server_loads_bit_for_bit(tmp_path: Path, no_unpickling: None) -> None:
    outcome = train_job(tiny_job(tmp_path))
    folder = tmp_path / "models" / "fm"
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    assert spec["backbone"] == {
        "family": "efficientnet_lite",
        "options": {**TINY, "weights_path": "backbone.safetensors"},
    }
    assert spec["group"] == "c4" and spec["default_method"] == "lambda" and spec["labels"][0] == "T-shirt/top"
    assert sorted(p.name for p in folder.iterdir()) == [
        "backbone.safetensors",  # a random-init trunk cannot be rebuilt from its options: saved
        "head.safetensors",
        "lambda_net.safetensors",
        "model.yaml",
    ]
    assert all(p.suffix == ".safetensors" for p in (tmp_path / "cache").iterdir())
    assert_same_outputs(outcome, tmp_path / "models", "fm", "c4")
    # a second run reads the feature cache (safetensors) and continues from the entry
    again = train_job(
        tiny_job(tmp_path, name="fm2", init_from="fm", config=TrainConfig(train_head=False, epochs=1, progress=False))
    )
    assert again.feature_seconds < outcome.feature_seconds
    assert torch.equal(again.backbone.classifier.weight, outcome.backbone.classifier.weight)  # head frozen
    assert_same_outputs(again, tmp_path / "models", "fm2", "c4")


def test_fine_tuned_backbone_round_trip(tmp_path: Path) -> None:
    config = TrainConfig(train_backbone=True, epochs=1, patience=1, batch_size=16, lr=1e-2, progress=False)
    outcome = train_job(tiny_job(tmp_path, group="hflip", config=config))
    assert outcome.written.trunk_saved
    assert_same_outputs(outcome, tmp_path / "models", "fm", "hflip")


def write_folder(root: Path, per_class: int, offset: int) -> None:
    data = fashion_mnist("test")
    for label, name in ((0, "shirt"), (1, "trouser"), (9, "boot")):
        (root / name).mkdir(parents=True)
        rows = np.flatnonzero(data.labels == label)[offset : offset + per_class]
        for i in rows:
            Image.fromarray(data.images[i]).save(root / name / f"{i}.png")


def test_cli_on_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_folder(tmp_path / "data" / "train", 8, 0)
    write_folder(tmp_path / "data" / "test", 4, 100)
    models, data = str(tmp_path / "models"), str(tmp_path / "data")
    common = ["--models-dir", models, "--data", data, "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    train = ["train", "--name", "folder-tv", "--backbone", "torchvision", "--option", "arch=resnet18", "input_size=32"]
    assert (
        main([*train, "--group", "rot180", "--objective", "equitune", "--val-size", "6", "--epochs", "2", *common]) == 0
    )
    spec = yaml.safe_load((tmp_path / "models" / "folder-tv" / "model.yaml").read_text())
    assert spec["labels"] == ["boot", "shirt", "trouser"] and spec["default_method"] == "equitune"
    assert "lambda_net" not in spec  # no λ-net was trained: the server uses uniform λ
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", "folder-tv", "--out", str(out), *common]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 12 and report["group"] == "rot180"
    assert set(report["accuracy"]) == {"vanilla", "equitune", "equizero_neg_max_prob", "equizero_entropy"}
    assert set(report["accuracy"]["equitune"]) == {"upright", "random", "every"}
    assert "equitune" in capsys.readouterr().out

"""Tiny random SCAN seq2seq models for fast translate tests, and one torch thread while they run
(tiny models gain nothing from more, and on a shared machine extra threads only wait)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from app.equivariance.lambda_net import LambdaNet
from app.tasks.base import LoadOptions
from app.tasks.translate.model import TranslateModel
from app.tasks.translate.seq2seq import Seq2Seq, Seq2SeqConfig
from app.tasks.translate.spec import TranslateSpec
from app.tasks.translate.vocab import ACTION_EOS, ACTION_PAD, ACTION_SOS


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_seq2seq(cell: str = "gru", seed: int = 0, hidden: int = 16) -> Seq2Seq:
    """A random model that writes a few actions before it stops (its end-of-sequence score lowered)."""
    torch.manual_seed(seed)
    model = Seq2Seq(Seq2SeqConfig(cell=cell, hidden=hidden)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        model.out.bias[ACTION_EOS] -= 2.0
        model.out.bias[ACTION_SOS] -= 5.0
        model.out.bias[ACTION_PAD] -= 5.0
    return model


def write_tiny_translate_model(
    models_dir: Path, name: str = "tiny-scan", group: str = "verb4", cell: str = "gru", trained_lambda: bool = True
) -> Path:
    folder = models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_seq2seq(cell)
    save_file(model.state_dict(), str(folder / "seq2seq.safetensors"))
    spec = {
        "task": "translate",
        "description": "tiny random SCAN model",
        "split": "add_jump",
        "backbone": {"family": "seq2seq", "options": {"cell": cell, "hidden": 16, "bidirectional": True}},
        "group": group,
        "default_method": "equizero",
        "max_actions": 12,
    }
    if trained_lambda:
        torch.manual_seed(1)
        save_file(LambdaNet(model.feature_dim).state_dict(), str(folder / "lambda_net.safetensors"))
        spec["lambda_net"] = "lambda_net.safetensors"
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return folder


def read_spec(folder: Path) -> TranslateSpec:
    return TranslateSpec.model_validate({**yaml.safe_load((folder / "model.yaml").read_text()), "name": folder.name})


def load_runner(folder: Path) -> TranslateModel:
    return TranslateModel.load(folder, read_spec(folder), LoadOptions(device="cpu"))

"""Tiny random DQN agents for fast act tests."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from app.equivariance.lambda_net import LambdaNet
from app.tasks.act.model import ActModel
from app.tasks.act.qnet import QNet
from app.tasks.act.spec import ActSpec
from app.tasks.act.symmetries import symmetry
from app.tasks.base import LoadOptions


def write_tiny_agent(root: Path, env_id: str = "CartPole-v1", name: str = "tiny-agent", seed: int = 0) -> Path:
    """A model folder with a random 8-unit Q-network and a random λ-net."""
    torch.manual_seed(seed)
    sym = symmetry(env_id)
    folder = root / name
    folder.mkdir(parents=True)
    QNet(sym.obs_dim, sym.n_actions, (8,)).save(folder / "qnet.safetensors")
    from safetensors.torch import save_file

    save_file(LambdaNet(8).state_dict(), str(folder / "lambda_net.safetensors"))
    spec = {
        "task": "act",
        "env": env_id,
        "group": sym.group_name,
        "backbone": {"family": "mlp", "options": {"hidden": [8]}},
        "lambda_net": "lambda_net.safetensors",
        "default_method": "equizero",
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return folder


def read_act_spec(folder: Path) -> ActSpec:
    return ActSpec.model_validate({**yaml.safe_load((folder / "model.yaml").read_text()), "name": folder.name})


def load_runner(folder: Path) -> ActModel:
    return ActModel.load(folder, read_act_spec(folder), LoadOptions(device="cpu"))

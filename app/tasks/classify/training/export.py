"""Write a trained model into the model repository, in the format the server loads unchanged.

``models/<name>/``: ``model.yaml`` plus ``head.safetensors`` (``weight``, ``bias`` of the
``nn.Linear``), ``lambda_net.safetensors`` and, only when the backbone's weights cannot be
rebuilt from its options (fine-tuned, or random init), ``backbone.safetensors`` (the trunk,
named by the ``weights_path`` option). After writing, the entry is loaded back through
``app.tasks.load_model`` and checked bit for bit against what was trained.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor, nn

from app.backbones.base import LinearHeadBackbone
from app.backbones.factory import create_backbone
from app.equivariance import FiniteGroup, LambdaNet, Method, ZeroLoss

from .features import backbone_fingerprint

HEAD_FILE, LAMBDA_FILE, TRUNK_FILE = "head.safetensors", "lambda_net.safetensors", "backbone.safetensors"


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().float().clone().contiguous() for k, v in module.state_dict().items()}


def rebuilds_same_trunk(backbone: LinearHeadBackbone, family: str, options: dict[str, Any]) -> bool:
    """Whether ``create_backbone(family, **options)`` always gives these exact trunk weights.

    Built twice under two different seeds: a random init differs between the two (and the
    global RNG state is restored, so training stays reproducible).
    """
    rng_state = torch.random.get_rng_state()
    try:
        rebuilt = set()
        for seed in (12345, 54321):
            torch.manual_seed(seed)
            rebuilt.add(backbone_fingerprint(create_backbone(family, **options)))
    finally:
        torch.random.set_rng_state(rng_state)
    return rebuilt == {backbone_fingerprint(backbone)}


@dataclass(frozen=True)
class WrittenModel:
    folder: Path
    spec: dict[str, Any]
    trunk_saved: bool


def write_model(
    models_dir: str | Path,
    name: str,
    *,
    family: str,
    options: dict[str, Any],
    backbone: LinearHeadBackbone,
    group: FiniteGroup,
    labels: list[str],
    lambda_net: LambdaNet | None,
    default_method: Method = Method.LAMBDA,
    zero_loss: ZeroLoss = ZeroLoss.NEG_MAX_PROB,
    description: str = "",
    header: str = "",
    save_trunk: bool | None = None,
) -> WrittenModel:
    """Write ``backbone.classifier`` as the head, the λ-net and (if needed) the trunk.

    ``save_trunk=None`` decides by rebuilding the backbone from ``options`` and comparing
    weight digests, so a random-init or fine-tuned trunk is never silently lost.
    """
    from app.repository import model_dir

    models_dir = Path(models_dir)
    folder = model_dir(models_dir, name)  # validates the name: no path escapes
    folder.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in options.items() if not (k == "weights_path" and str(v).endswith(".safetensors"))}
    if save_trunk is None:
        save_trunk = not rebuilds_same_trunk(backbone, family, options)
    if save_trunk:
        save_file(backbone.trunk_state(), str(folder / TRUNK_FILE), metadata={"format": "equiserve-trunk-v1"})
        options["weights_path"] = TRUNK_FILE
    elif (folder / TRUNK_FILE).exists():
        (folder / TRUNK_FILE).unlink()  # a stale trunk from an earlier run must not linger

    save_file(_tensors(backbone.classifier), str(folder / HEAD_FILE))
    spec: dict[str, Any] = {
        "description": description or f"{backbone.name} transferred to {len(labels)} classes, group {group.name}",
        "task": "classify",
        "backbone": {"family": family, "options": options},
        "group": group.name,
        "methods": [m.value for m in Method],
        "default_method": Method(default_method).value,
        "zero_loss": ZeroLoss(zero_loss).value,
        "head": HEAD_FILE,
        "labels": list(labels),
    }
    if lambda_net is not None:
        save_file(_tensors(lambda_net), str(folder / LAMBDA_FILE))
        spec["lambda_net"] = LAMBDA_FILE
    elif (folder / LAMBDA_FILE).exists():
        (folder / LAMBDA_FILE).unlink()
    stamp = (
        f"# written by app/tasks/classify/training/export.py on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
    )
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.strip().splitlines()) if header else ""
    (folder / "model.yaml").write_text(stamp + comment + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    for path in folder.iterdir():  # safetensors writes 0600: a non-root server (the container) must read them
        path.chmod(0o644)
    return WrittenModel(folder, spec, save_trunk)


@torch.no_grad()
def verify_reload(
    models_dir: str | Path,
    name: str,
    backbone: LinearHeadBackbone,
    lambda_net: LambdaNet | None,
    probe_features: Tensor,
) -> None:
    """Load the entry as the server does and check it is what was trained, bit for bit:
    the trunk's weight digest, and the head's logits and λ-net's outputs on ``probe_features``."""
    from app.tasks import load_model

    loaded = load_model(Path(models_dir), name, device="cpu")
    if backbone_fingerprint(loaded.backbone) != backbone_fingerprint(backbone):
        raise RuntimeError(f"{name}: the reloaded backbone's weights differ from the trained ones")
    probe = probe_features.cpu().float()
    if not torch.equal(loaded.backbone.head(probe), backbone.head(probe.to(backbone.device)).cpu()):
        raise RuntimeError(f"{name}: the reloaded head gives different logits")
    if lambda_net is not None:
        assert loaded.model.lambda_net is not None
        if not torch.equal(loaded.model.lambda_net(probe), lambda_net(probe.to(backbone.device)).cpu()):
            raise RuntimeError(f"{name}: the reloaded λ-net gives different weights")

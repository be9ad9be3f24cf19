"""The model repository's files: ``models/<name>/model.yaml`` plus small safetensors files.

What every task's loader shares: safe paths inside an entry's folder, safetensors reading with
errors that name the file, the λ-net, devices and dtypes. Nothing is unpickled. Reading an
entry's ``model.yaml`` with its task's spec is ``app.tasks.read_spec``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from app.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

    from app.equivariance import LambdaNet

log = logging.getLogger("equiserve.repository")

__all__ = ["ModelLoadError"]


class WithLambdaNet(Protocol):
    """What ``load_lambda_net`` reads of an entry's spec."""

    name: str
    lambda_net: str | None


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def model_dir(models_dir: Path, name: str) -> Path:
    """``models_dir/name``, refusing names that could escape the repository.

    The name is one path component (no separator, no leading dot), so the entry is inside the
    repository whatever it links to: an operator may symlink an entry to a folder kept elsewhere.
    """
    if not MODEL_NAME.match(name):
        raise ModelLoadError(f"invalid model name {name!r}")
    return (models_dir / name).absolute()


def list_models(models_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in models_dir.glob("*/model.yaml") if MODEL_NAME.match(p.parent.name))


def path_in(folder: Path, relative: str) -> Path | None:
    """``folder/relative`` if ``relative`` names a path below ``folder`` (no ``..``, not absolute), else None.

    The check is on the name, not on where symlinks lead: weights linked from a download cache
    (Hugging Face keeps its files as links to blobs) are served, ``../../x`` is not.
    """
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return folder / path


def file_in(folder: Path, relative: str) -> Path:
    """A file named by an entry: inside its folder, and present."""
    path = path_in(folder, relative)
    if path is None:
        raise ModelLoadError(f"{folder.name}: {relative!r} points outside the model folder")
    if not path.is_file():
        raise ModelLoadError(f"{folder.name}: file {path} is missing")
    return path


def resolve_file_options(folder: Path, options: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``options`` with the relative paths under ``keys`` resolved inside the entry's folder."""
    resolved = dict(options)
    for key in keys:
        if isinstance(resolved.get(key), str) and not Path(resolved[key]).is_absolute():
            resolved[key] = str(file_in(folder, resolved[key]))
    return resolved


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc


def load_lambda_net(folder: Path, spec: WithLambdaNet, feature_dim: int, device: torch.device) -> LambdaNet:
    """The entry's trained λ-net, or a constant one (uniform λ: λ-equitune = equitune)."""
    from app.equivariance import LambdaNet

    if spec.lambda_net is None:
        net = LambdaNet.constant(feature_dim)
    else:
        state = load_tensors(file_in(folder, spec.lambda_net))
        weight = state.get("mlp.0.weight")
        net = LambdaNet(feature_dim, weight.shape[0] if weight is not None else 100)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(f"{spec.name}: λ-net {spec.lambda_net} does not fit the backbone: {exc}") from exc
    return net.to(device).eval()  # float32 whatever the backbone's dtype: it is tiny


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("EQUISERVE_DEVICE=cuda but no CUDA device is visible: falling back to the CPU")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    # Half precision on the CPU is slower and less exact than float32: the CPU stays float32.
    return getattr(torch, dtype) if device.type == "cuda" else torch.float32

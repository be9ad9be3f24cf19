"""The model repository: ``models/<name>/model.yaml`` plus small safetensors files.

A model entry names a backbone, a group, the methods it serves and, optionally, a trained
λ-net, a transfer-learned linear head and its labels. Everything is loaded once, with
safetensors only (no pickles), and checked before the server turns ready.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file

from app.backbones.base import ImageBackbone, LinearHeadBackbone
from app.backbones.factory import create_backbone
from app.backbones.onnx_cache import can_export, onnx_backbone
from app.backbones.onnx_runtime import OnnxBackbone
from app.config import Runtime
from app.equivariance import IMAGE_GROUPS, EquivariantModel, LambdaNet, Method, ZeroLoss, image_group

from .errors import InvalidInput
from .text_spec import GenerationSpec, TextGroupSpec, check_generate_spec

log = logging.getLogger("equiserve.registry")

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelLoadError(RuntimeError):
    """A model entry that cannot be served: names the model and the file at fault."""


class BackboneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: Literal["efficientnet_lite", "torchvision", "open_clip", "onnx", "causal_lm"]
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the backbone class")


class ModelSpec(BaseModel):
    """The schema of ``model.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    task: Literal["classify", "generate"] = "classify"
    description: str = ""
    backbone: BackboneSpec
    group: str
    methods: list[Method] = Field(default_factory=lambda: list(Method))
    default_method: Method = Method.EQUITUNE
    zero_loss: ZeroLoss = ZeroLoss.NEG_MAX_PROB
    lambda_net: str | None = Field(None, description="safetensors file of a trained λ-net")
    head: str | None = Field(None, description="safetensors file of a linear head (weight, bias)")
    labels: list[str] | str | None = Field(None, description="label names, or a text file with one per line")
    optional: bool = Field(False, description="skip when the weights need a download, unless named")
    text_group: TextGroupSpec | None = Field(None, description="task generate: how the word-swap group is built")
    generation: GenerationSpec | None = Field(None, description="task generate: limits and defaults")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.task == "generate":  # a language model: served by app.engine.text_engine
            check_generate_spec(self.backbone.family, self.group, self.text_group, self.head, self.labels)
        elif self.group not in IMAGE_GROUPS:
            raise ValueError(f"unknown group {self.group!r}; choose from {list(IMAGE_GROUPS)}")
        if self.default_method not in self.methods:
            raise ValueError(f"default_method {self.default_method.value!r} is not among methods")
        if self.head is not None and self.labels is None:
            raise ValueError("a head needs its labels")
        return self

    def resolve_method(self, method: str | None) -> Method:
        """A request's ``method`` (None: the default), refused (422) unless this entry serves it."""
        if method is None:
            return self.default_method
        if method not in {m.value for m in self.methods}:
            allowed = [m.value for m in self.methods]
            raise InvalidInput(f"method {method!r} is not served by {self.name}; choose from {allowed}")
        return Method(method)


@dataclass
class LoadedModel:
    """A model ready to serve: backbone on its device, wrapped with its group and λ-net."""

    spec: ModelSpec
    backbone: ImageBackbone
    model: EquivariantModel
    lambda_trained: bool
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def transforms(self) -> list[str]:
        return self.model.group.names

    @property
    def zero_shot(self) -> bool:
        return self.backbone.zero_shot

    @property
    def runtime(self) -> str:
        """What runs the backbone: ``torch`` or ``onnxruntime``."""
        return "onnxruntime" if isinstance(self.backbone, OnnxBackbone) else "torch"


def model_dir(models_dir: Path, name: str) -> Path:
    """``models_dir/name``, refusing names that could escape the repository."""
    if not MODEL_NAME.match(name):
        raise ModelLoadError(f"invalid model name {name!r}")
    path = (models_dir / name).resolve()
    if path.parent != models_dir.resolve():
        raise ModelLoadError(f"model {name!r} is outside {models_dir}")
    return path


def _file_in(folder: Path, relative: str) -> Path:
    path = (folder / relative).resolve()
    if folder.resolve() not in path.parents:
        raise ModelLoadError(f"{folder.name}: {relative!r} points outside the model folder")
    if not path.is_file():
        raise ModelLoadError(f"{folder.name}: file {path} is missing")
    return path


def read_spec(folder: Path) -> ModelSpec:
    path = folder / "model.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path} is missing") from exc
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return ModelSpec(name=folder.name, **raw)
    except (ValidationError, TypeError) as exc:
        raise ModelLoadError(f"{path} is invalid: {exc}") from exc


def list_models(models_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in models_dir.glob("*/model.yaml") if MODEL_NAME.match(p.parent.name))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc


def _labels(folder: Path, labels: list[str] | str | None) -> list[str] | None:
    if labels is None or isinstance(labels, list):
        return labels
    return [line.strip() for line in _file_in(folder, labels).read_text().splitlines() if line.strip()]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("EQUISERVE_DEVICE=cuda but no CUDA device is visible: falling back to the CPU")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    # Half precision on the CPU is slower and less exact than float32: the CPU stays float32.
    return getattr(torch, dtype) if device.type == "cuda" else torch.float32


def load_model(
    models_dir: Path,
    name: str,
    device: str = "auto",
    dtype: str = "float32",
    channels_last: bool = True,
    *,
    runtime: Runtime = "torch",
    onnx_cache_dir: Path | None = None,
    threads: int | None = None,
) -> LoadedModel:
    """Load entry ``name`` onto ``device``.

    ``runtime``: what runs the backbone. ``onnxruntime`` exports it (once, cached in
    ``onnx_cache_dir``) and runs it with onnxruntime on the CPU, several times faster there
    than eager torch; ``auto`` does that on the CPU for fixed-label backbones and keeps torch
    elsewhere (CUDA, zero-shot CLIP). ``threads``: onnxruntime's intra-op threads.
    """
    folder = model_dir(models_dir, name)
    spec = read_spec(folder)
    if spec.task != "classify":
        raise ModelLoadError(f"{name} is a language model: app.engine.generation.load_text_model loads it")
    options = dict(spec.backbone.options)
    for key in ("weights_path", "checkpoint", "path"):  # files named by the entry live in its folder
        if isinstance(options.get(key), str) and not Path(options[key]).is_absolute():
            options[key] = str(_file_in(folder, options[key]))
    try:
        backbone = create_backbone(spec.backbone.family, **options)
    except (FileNotFoundError, OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{name}: cannot build the {spec.backbone.family} backbone: {exc}") from exc

    labels = _labels(folder, spec.labels)
    if spec.head is not None:
        if not isinstance(backbone, LinearHeadBackbone):
            raise ModelLoadError(f"{name}: a head file needs a CNN backbone, not {spec.backbone.family}")
        try:
            backbone.replace_head(labels or [], _load_tensors(_file_in(folder, spec.head)))
        except RuntimeError as exc:
            raise ModelLoadError(f"{name}: head {spec.head} does not fit: {exc}") from exc
    elif labels is not None:
        backbone.labels = labels

    lambda_net = LambdaNet.constant(backbone.feature_dim)  # untrained: uniform λ, i.e. equitune
    if spec.lambda_net is not None:
        state = _load_tensors(_file_in(folder, spec.lambda_net))
        hidden = state.get("mlp.0.weight", torch.empty(100, 0)).shape[0]
        lambda_net = LambdaNet(backbone.feature_dim, hidden)
        try:
            lambda_net.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(f"{name}: λ-net {spec.lambda_net} does not fit the backbone: {exc}") from exc

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    backbone.to_runtime(torch_device, torch_dtype, channels_last=channels_last)
    if _wants_onnxruntime(runtime, backbone, torch_device):
        try:
            backbone = onnx_backbone(backbone, onnx_cache_dir, threads)
        except Exception as exc:  # the exporter fails in many ways; torch still serves the model
            if runtime == "onnxruntime":
                raise ModelLoadError(f"{name}: cannot run the backbone with onnxruntime: {exc}") from exc
            log.warning("%s: ONNX export failed (%s: %s); serving with torch", name, type(exc).__name__, exc)
    lambda_net = lambda_net.to(torch_device).eval()  # the λ-net stays float32: it is tiny
    model = EquivariantModel(
        backbone.encode, backbone.head, image_group(spec.group), lambda_net=lambda_net, zero_loss=spec.zero_loss
    ).eval()
    return LoadedModel(spec, backbone, model, spec.lambda_net is not None, torch_device, backbone.dtype)


def _wants_onnxruntime(runtime: Runtime, backbone: ImageBackbone, device: torch.device) -> bool:
    if runtime == "torch":
        return False
    if runtime == "auto":
        return device.type == "cpu" and can_export(backbone)
    if device.type != "cpu" or not can_export(backbone):
        raise ModelLoadError(
            f"{backbone.name}: runtime onnxruntime needs the CPU and a fixed-label backbone "
            f"(device {device.type}, zero-shot {backbone.zero_shot})"
        )
    return True

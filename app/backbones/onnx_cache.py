"""Run a torch image backbone with onnxruntime on the CPU, through an export cache.

Why: on a CPU, onnxruntime runs EfficientNet-Lite0 several times faster than eager torch
(README, "Performance") because it folds batch norm into the convolutions and uses blocked
layouts; and unlike eager torch, its cost per image *falls* with the batch, which is what
makes the fused |G|·B pass pay on a CPU.

Exporting takes seconds, so the graph is cached under a key that covers everything the graph
depends on: the backbone's class, name, input size, labels, mean/std, every weight and buffer,
and the torch, onnx and exporter versions. A changed head or trunk gets a new file; an
unchanged model loads its graph at once. Files are written to a temporary name
and renamed, so a crash or a concurrent start never leaves a half-written graph under the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from .base import ImageBackbone
from .onnx_runtime import DEFAULT_OPSET, OnnxBackbone, export_onnx

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "equiserve" / "onnx"


def can_export(backbone: ImageBackbone) -> bool:
    """Fixed-label torch backbones only: a zero-shot head changes with every label set, and an
    ONNX backbone is one already."""
    return not backbone.zero_shot and not isinstance(backbone, OnnxBackbone)


def export_key(backbone: ImageBackbone) -> str:
    """A digest of everything the exported graph depends on."""
    import onnx
    import onnxscript

    digest = hashlib.sha256()
    meta = {
        "class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
        "name": backbone.name,
        "input_size": backbone.input_size,
        "labels": backbone.labels,
        "mean": backbone.mean.flatten().tolist(),
        "std": backbone.std.flatten().tolist(),
        "versions": [torch.__version__, onnx.__version__, onnxscript.__version__, DEFAULT_OPSET],
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for key, tensor in backbone.state_dict().items():
        digest.update(key.encode())
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def session_options(threads: int | None) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def onnx_backbone(backbone: ImageBackbone, cache_dir: Path | None = None, threads: int | None = None) -> OnnxBackbone:
    """``backbone`` (float32, on the CPU) as an ``OnnxBackbone`` on the CPU, exported once per key."""
    if not can_export(backbone):
        raise ValueError(f"{backbone.name}: only fixed-label torch backbones can be exported to ONNX")
    if backbone.dtype != torch.float32 or backbone.device.type != "cpu":
        raise ValueError(f"{backbone.name}: export a float32 CPU backbone (got {backbone.dtype} on {backbone.device})")
    cache_dir = cache_dir or default_cache_dir()
    path = cache_dir / f"{backbone.name}-{export_key(backbone)}.onnx"
    if path.is_file():
        log.debug("%s: onnxruntime graph from the cache %s", backbone.name, path)
    else:
        cache_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".export-") as scratch:
            exported = export_onnx(backbone, Path(scratch) / path.name)
            os.replace(exported, path)
        log.info("%s: exported to ONNX for onnxruntime in %.1f s (once per model; cached in %s)",
                 backbone.name, time.perf_counter() - started, cache_dir)  # fmt: skip
    return OnnxBackbone(path, device="cpu", session_options=session_options(threads))

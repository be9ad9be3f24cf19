"""Run a torch image backbone with onnxruntime on the CPU, through an export cache.

Why: on a CPU, onnxruntime runs EfficientNet-Lite0 several times faster than eager torch
(docs/performance.md) because it folds batch norm into the convolutions and uses blocked
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
from collections.abc import Callable
from pathlib import Path

import torch

from app.config import default_cache_dir

from .base import ImageBackbone
from .onnx_quant import Calibration, int8_key, quantize_int8
from .onnx_runtime import DEFAULT_OPSET, INPUT_NAME, META_KEY, OnnxBackbone, export_onnx

log = logging.getLogger(__name__)


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


def session_options(threads: int | None, *, spin: bool = False) -> object:
    """``spin``: onnxruntime's default, where the intra-op threads busy-wait between operators
    and after a run. Off, they sleep: on a shared or small CPU the spinning threads otherwise
    hold the cores that decoding, the event loop and the next request are waiting for."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def _write_once(path: Path, write: Callable[[Path], Path], what: str, name: str) -> None:
    """Write ``path`` through a scratch file renamed into place (never half-written under the key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        os.replace(write(Path(scratch) / path.name), path)
    log.info("%s: %s in %.1f s (once per model; cached in %s)", name, what, time.perf_counter() - started, path.parent)


def onnx_backbone(
    backbone: ImageBackbone,
    cache_dir: Path | None = None,
    threads: int | None = None,
    *,
    precision: str = "float32",
    calibration: Calibration | None = None,
    device: str | torch.device = "cpu",
    provider: str = "auto",
    fp16: bool = False,
    spin: bool = False,
) -> OnnxBackbone:
    """``backbone`` (float32, on the CPU) as an ``OnnxBackbone`` on ``device``, exported once per key.

    ``precision="int8"``: the float graph quantized (``onnx_quant``), calibrated on
    ``calibration``, cached under its own key (the float key, the calibration set, the quantizer).
    """
    if not can_export(backbone):
        raise ValueError(f"{backbone.name}: only fixed-label torch backbones can be exported to ONNX")
    if backbone.dtype != torch.float32 or backbone.device.type != "cpu":
        raise ValueError(f"{backbone.name}: export a float32 CPU backbone (got {backbone.dtype} on {backbone.device})")
    if precision not in ("float32", "int8"):
        raise ValueError(f"unknown precision {precision!r}: float32 or int8")
    cache_dir = cache_dir or default_cache_dir()
    key = export_key(backbone)
    path = cache_dir / f"{backbone.name}-{key}.onnx"
    if path.is_file():
        log.debug("%s: onnxruntime graph from the cache %s", backbone.name, path)
    else:
        _write_once(
            path, lambda target: export_onnx(backbone, target), "exported to ONNX for onnxruntime", backbone.name
        )
    if precision == "int8":
        calibration = calibration or Calibration()
        float_path = path
        path = cache_dir / f"{backbone.name}-{key}-int8-{int8_key(key, calibration.id(backbone.input_size))}.onnx"
        if not path.is_file():
            pixels = calibration.pixels(backbone.input_size)
            _write_once(
                path,
                lambda target: quantize_int8(float_path, target, pixels, meta_key=META_KEY, input_name=INPUT_NAME),
                f"quantized to int8 (QDQ, {len(pixels)} calibration images from {calibration.source})",
                backbone.name,
            )
    return OnnxBackbone(
        path,
        device=device,
        session_options=session_options(threads, spin=spin),
        provider=provider,
        tensorrt_cache=cache_dir / "tensorrt",
        fp16=fp16,
    )

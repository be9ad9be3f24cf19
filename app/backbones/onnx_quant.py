"""int8 backbones for onnxruntime on the CPU: static QDQ quantization, calibrated on real images.

Why int8 and why it is safe for equiserve: on a CPU the fused pass costs |G| forwards of the
backbone, and int8 convolutions (VNNI) do several times the work of float32 per cycle. Group
averaging makes any backbone exactly invariant, a quantized one included: the copies of a
rotated input are the copies of the input, permuted, and each copy goes through the same
quantized graph with the same fixed scales. So int8 may cost accuracy, never invariance.

How: the float export (``onnx_cache``) is quantized with ``onnxruntime.quantization``'s static
quantizer in QDQ format: per-channel symmetric int8 weights, asymmetric uint8 activations whose
ranges come from a calibration pass (min/max) over real images, preprocessed by the server's own
``pixels_from_uint8`` and expanded by the model's group (calibrated on what is served: every
rotated copy). The linear head and the first convolution stay float (they are a tiny part of
the cost and the most sensitive to rounding: the raw pixels and the logits). The graph keeps
its inputs and outputs in float32, so ``OnnxBackbone`` runs it unchanged.

Calibration sets (``calibration_images``): ``photos`` (the web page's examples, which ship in
the package, and scikit-image's sample photos when it is installed; several seeded crops of
each), ``fashion-mnist`` (training images from the Debian package ``dataset-fashion-mnist``), or
a folder of image files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "web" / "static" / "examples"
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
QUANT_CONFIG = {  # everything about the quantizer that changes the graph (part of the cache key)
    "format": "QDQ",
    "weights": "int8 per-channel symmetric",
    "activations": "uint8 asymmetric",
    "calibration": "minmax",
    "float_ops": ["first Conv", "Gemm/MatMul head"],
}
CROPS_PER_PHOTO = 8
DEFAULT_CALIBRATION_COUNT = {"photos": None, "fashion-mnist": 256}  # None: every crop of every photo


# -- calibration images ---------------------------------------------------------------------------


def _random_crops(image: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The whole image, then ``count - 1`` seeded crops covering 35-100 % of its shorter side:
    the served model sees whole photos, but activation ranges must also cover close-ups."""
    crops = [image]
    height, width = image.shape[:2]
    for _ in range(count - 1):
        side = int(min(height, width) * rng.uniform(0.35, 1.0))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crops.append(np.ascontiguousarray(image[top : top + side, left : left + side]))
    return crops


def photo_set() -> list[tuple[str, np.ndarray]]:
    """The photos ``photos`` calibrates on: the web examples (always shipped) and scikit-image's
    sample photos (when installed), decoded by the server's decoder."""
    from app.backbones.images import decode_image

    photos = [
        (path.stem, decode_image(path.read_bytes(), max_pixels=50_000_000))
        for path in sorted(EXAMPLES_DIR.glob("*.jpg"))
    ]
    try:
        import skimage.data
    except ImportError:
        log.info("scikit-image is not installed: calibrating on the %d web examples only", len(photos))
        return photos
    for name in SKIMAGE_PHOTOS:
        try:
            photos.append((f"skimage:{name}", np.ascontiguousarray(getattr(skimage.data, name)())))
        except Exception as exc:  # a sample that would need a download
            log.info("skipping scikit-image photo %s: %s", name, exc)
    return photos


def calibration_images(source: str, *, count: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """``uint8 [H, W, 3]`` RGB images of a calibration set (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if source == "photos":
        images = [crop for _, photo in photo_set() for crop in _random_crops(photo, CROPS_PER_PHOTO, rng)]
    elif source == "fashion-mnist":
        from app.backbones.datasets import fashion_mnist

        data = fashion_mnist("train")
        n = count or DEFAULT_CALIBRATION_COUNT["fashion-mnist"]
        images = [data.rgb(int(i)) for i in rng.choice(len(data), size=min(n, len(data)), replace=False)]
    else:
        from app.backbones.images import decode_image

        images = [decode_image(path.read_bytes(), max_pixels=50_000_000) for path in folder_files(source)]
    if count is not None:
        images = images[:count]
    if not images:
        raise ValueError(f"calibration set {source!r} has no images")
    return images


def folder_files(source: str | Path) -> list[Path]:
    from app.backbones.datasets import IMAGE_SUFFIXES

    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration set {str(source)!r} is neither 'photos', 'fashion-mnist' nor a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def calibration_id(source: str, *, count: int | None = None, seed: int = 0) -> str:
    """What identifies a calibration set without decoding it (part of the int8 cache key)."""
    parts: list[Any] = [source, count, seed]
    if source == "photos":
        try:
            import skimage

            parts.append(["skimage", skimage.__version__, SKIMAGE_PHOTOS, CROPS_PER_PHOTO])
        except ImportError:
            parts.append(["no skimage", CROPS_PER_PHOTO])
        parts += [(p.name, p.stat().st_size) for p in sorted(EXAMPLES_DIR.glob("*.jpg"))]
    elif source != "fashion-mnist":
        parts += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder_files(source)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def calibration_pixels(
    images: Sequence[np.ndarray], input_size: int, expand: Callable[[Any], Any] | None = None
) -> np.ndarray:
    """``float32 [N·|G|, 3, S, S]``: the server's preprocessing, then the group's copies."""
    import torch

    from .preprocess import pixels_from_uint8

    pixels = torch.stack([pixels_from_uint8(image, input_size) for image in images])
    if expand is not None:
        pixels = expand(pixels)
    return pixels.contiguous().numpy()


def pixels_digest(pixels: np.ndarray) -> str:
    digest = hashlib.sha256(str((pixels.dtype, pixels.shape)).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()[:16]


# -- quantization -----------------------------------------------------------------------------------


def float_nodes(model: Any) -> list[str]:
    """The nodes left in float: the first convolution (raw pixels in) and the linear head
    (Gemm/MatMul nodes after the last convolution: the logits)."""
    nodes = list(model.graph.node)
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    if not convs:
        return []
    keep = [nodes[convs[0]].name]
    keep += [node.name for node in nodes[convs[-1] + 1 :] if node.op_type in ("Gemm", "MatMul")]
    return keep


class _Batches:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over calibration pixels."""

    def __init__(self, input_name: str, pixels: np.ndarray, batch_size: int = 16) -> None:
        self._batches = iter([{input_name: pixels[i : i + batch_size]} for i in range(0, len(pixels), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # the quantizer may ask; one pass is all min/max needs
        return None


def quantize_int8(float_path: Path, out_path: Path, pixels: np.ndarray, *, meta_key: str, input_name: str) -> Path:
    """Write ``float_path`` quantized to int8 (QDQ) as ``out_path``, calibrated on ``pixels``.

    The equiserve metadata is carried over with ``precision: int8`` and what it was calibrated on.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference and graph cleanup first, as onnxruntime recommends for static quantization.
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=False)
        model = onnx.load(str(prepared))
        excluded = float_nodes(model)
        del model
        quantized = Path(scratch) / out_path.name
        quantize_static(
            str(prepared),
            str(quantized),
            _Batches(input_name, pixels),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=excluded,
        )
        result = onnx.load(str(quantized))
        source_meta = {p.key: p.value for p in onnx.load(str(float_path), load_external_data=False).metadata_props}
        meta = json.loads(source_meta[meta_key])
        meta.update(precision="int8", calibration={"images": len(pixels), "digest": pixels_digest(pixels)})
        del result.metadata_props[:]
        result.metadata_props.add(key=meta_key, value=json.dumps(meta))
        onnx.save(result, str(quantized))
        quantized.replace(out_path)  # atomic: a crash never leaves a half-written graph under the key
    return out_path


def int8_key(float_key: str, calibration_id: str) -> str:
    """The int8 graph's key: the float graph's key, the calibration set and the quantizer."""
    import onnxruntime

    payload = json.dumps([float_key, calibration_id, QUANT_CONFIG, onnxruntime.__version__], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Calibration:
    """A calibration set for a backbone: its images (``calibration_images``), preprocessed at
    the backbone's input size and expanded by ``group`` (the served copies), decoded only when
    a graph is actually quantized (a cache hit needs only ``id``)."""

    source: str = "photos"
    count: int | None = None
    seed: int = 0
    group: str | None = None  # an image group name (app.equivariance), or None for no copies

    def id(self, input_size: int) -> str:
        return f"{calibration_id(self.source, count=self.count, seed=self.seed)}:{self.group}:{input_size}"

    def pixels(self, input_size: int) -> np.ndarray:
        expand = None
        if self.group is not None:
            from app.equivariance import image_group

            expand = image_group(self.group).expand
        return calibration_pixels(calibration_images(self.source, count=self.count, seed=self.seed), input_size, expand)

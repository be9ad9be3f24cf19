"""Backbone features of every group copy, computed once and kept on disk as safetensors.

With a frozen backbone the λ-net and the head only ever see ``features[g, i]``, the features
of copy ``g`` of image ``i``. Computing them is >99% of the cost of an epoch, so we compute
them once, with the serving model's own fused pass (``EquivariantModel.encode_copies``), and
every later epoch, run and evaluation costs milliseconds.

Two facts make one cache serve more than its own group:

* a subgroup's copies are a subset of the group's copies (c4's four elements are d4's first
  four, by name and by action), so a d4 cache serves c4, hflip, vflip and rot180;
* the copies of a transformed image ``h x`` are the copies of ``x`` in another order, since
  ``g (h x) = (g h) x``: test sets under a random (or every) group element need no new
  forward pass, only a gather (``transformed``).

The cache key is a digest of the backbone's weights (not of its config: a random-init
backbone must never hit a cache made by another random init), its input size and
normalisation, the data's fingerprint and the preprocessed pixels of a few images (so a
change to the preprocessing code is a cache miss, not stale features). Files are safetensors: loading them cannot run
code, unlike a pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from app.backbones.base import ImageBackbone
from app.backbones.datasets import ImageSet
from app.equivariance import EquivariantModel, FiniteGroup, pool_features
from app.tasks.classify.training import DEFAULT_CACHE_DIR

log = logging.getLogger("equiserve.training")

CACHE_VERSION = 1


@dataclass(frozen=True)
class CopyFeatures:
    """``features[g, i]``: pooled backbone features of copy ``g`` (of ``group``) of image ``i``."""

    features: Tensor  # [|G|, N, D] float32
    labels: Tensor  # [N] int64
    group: FiniteGroup
    compute_seconds: float | None = None  # what computing them took (also when read from the cache)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def restrict(self, group: FiniteGroup) -> CopyFeatures:
        """The copies of a subgroup, e.g. c4 from a d4 cache."""
        return CopyFeatures(
            select_copies(self.features, self.group.names, group), self.labels, group, self.compute_seconds
        )


def backbone_fingerprint(backbone: ImageBackbone) -> str:
    """sha256 of what determines ``backbone.encode``: class, input size, mean/std, trunk weights.

    The linear head (``classifier.*``) is left out: features do not depend on it, so a cache
    survives training a new head.
    """
    digest = hashlib.sha256()
    digest.update(f"{type(backbone).__module__}.{type(backbone).__qualname__}:{backbone.input_size}".encode())
    for buffer in (backbone.mean, backbone.std):
        digest.update(buffer.detach().float().cpu().numpy().tobytes())
    for key, value in sorted(backbone.state_dict().items()):
        if key.startswith("classifier."):
            continue
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def use_fast_cpu_layout(backbone: ImageBackbone) -> None:
    """channels_last on the CPU: much faster for EfficientNet-Lite's depthwise convolutions with
    torch 2.x; the same math, the features agree up to float rounding."""
    backbone.to(memory_format=torch.channels_last)
    backbone.channels_last = True


@torch.inference_mode()
def extract_features(
    backbone: ImageBackbone,
    group: FiniteGroup,
    data: ImageSet,
    *,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "features",
) -> CopyFeatures:
    """Features of all ``|G|`` copies of every image: ``batch_size`` images (``|G|*batch_size``
    copies) per fused backbone call, exactly the serving model's ``encode_copies``."""
    was_training = backbone.training
    backbone.eval()  # BatchNorm statistics and no dropout, as in serving
    model = EquivariantModel(backbone.encode, backbone.head, group)
    chunks = []
    with tqdm(total=len(data), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for pixels, _ in data.batches(backbone.input_size, batch_size):
            features, _ = model.encode_copies(pixels.to(backbone.device))
            chunks.append(pool_features(features.flatten(0, 1)).reshape(group.order, pixels.shape[0], -1).float().cpu())
            bar.update(pixels.shape[0])
    backbone.train(was_training)
    return CopyFeatures(torch.cat(chunks, dim=1).contiguous(), torch.as_tensor(data.labels, dtype=torch.long), group)


def select_copies(features: Tensor, names: list[str], group: FiniteGroup) -> Tensor:
    """The copies of ``group`` from per-copy ``features`` of the elements ``names`` (a
    supergroup: c4 from d4, matched by element name, which fixes the action)."""
    if names == group.names:
        return features
    position = {name: i for i, name in enumerate(names)}
    missing = [name for name in group.names if name not in position]
    if missing:
        raise ValueError(f"cached copies {names} lack elements {missing} of {group.name}")
    return features.index_select(0, torch.tensor([position[name] for name in group.names]))


def transformed_order(group: FiniteGroup, elements: Tensor) -> Tensor:
    """``[|G|, N]`` copy indices: copy ``g`` of ``h_i x_i`` is copy ``g h_i`` of ``x_i``."""
    return group.table.to(elements.device)[:, elements]


def transformed(tensor: Tensor, group: FiniteGroup, elements: Tensor) -> Tensor:
    """Per-copy tensor ``[|G|, N, ...]`` of ``x`` -> the same for the inputs ``h_i x_i``
    (``elements`` = ``[N]`` indices ``h_i``); a gather, no forward pass."""
    order = transformed_order(group, elements)
    index = order.reshape(*order.shape, *([1] * (tensor.dim() - 2))).expand_as(tensor)
    return tensor.gather(0, index)


class FeatureCache:
    """``<root>/<key>.<group>.safetensors``: ``features`` [|G|, N, D] and ``labels`` [N].

    ``load_or_compute(backbone, group, data)`` returns the copies of ``group``, computing and
    storing them only when no cached group (the same or a supergroup) has them.
    """

    def __init__(self, root: str | Path = DEFAULT_CACHE_DIR, *, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled

    @staticmethod
    def key(backbone: ImageBackbone, data: ImageSet) -> str:
        # The preprocessed pixels of a few images stand for the preprocessing code: if
        # ``pixels_from_uint8`` changes, old features are not served under the new code.
        probe = data.pixels(range(min(4, len(data))), backbone.input_size).numpy().tobytes()
        material = {
            "version": CACHE_VERSION,
            "backbone": backbone_fingerprint(backbone),
            "data": data.fingerprint,
            "preprocessing": hashlib.sha256(probe).hexdigest(),
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]

    def _find(self, key: str, group: FiniteGroup) -> Path | None:
        candidates = sorted(self.root.glob(f"{key}.*.safetensors"))
        # Prefer an exact match, then the smallest supergroup (least to read).
        best: tuple[int, Path] | None = None
        for path in candidates:
            with safe_open(str(path), framework="pt") as f:
                names = json.loads((f.metadata() or {}).get("elements", "[]"))
            if set(group.names) <= set(names) and (best is None or len(names) < best[0]):
                best = (len(names), path)
        return best[1] if best else None

    def load(self, path: Path, group: FiniteGroup) -> CopyFeatures:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        seconds = float(meta["seconds"]) if "seconds" in meta else None
        return CopyFeatures(
            select_copies(tensors["features"], json.loads(meta["elements"]), group), tensors["labels"], group, seconds
        )

    def load_or_compute(
        self,
        backbone: ImageBackbone,
        group: FiniteGroup,
        data: ImageSet,
        *,
        batch_size: int = 32,
        progress: bool = True,
    ) -> CopyFeatures:
        key = self.key(backbone, data)
        if self.enabled and (path := self._find(key, group)) is not None:
            log.info("feature cache hit: %s (%s, %d images)", path.name, group.name, len(data))
            return self.load(path, group)
        start = time.perf_counter()
        copies = extract_features(
            backbone, group, data, batch_size=batch_size, progress=progress, desc=f"{data.name} x{group.name}"
        )
        elapsed = time.perf_counter() - start
        copies = CopyFeatures(copies.features, copies.labels, group, elapsed)
        log.info("features of %d images x %d copies in %.1f s", len(data), group.order, elapsed)
        if self.enabled:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / f"{key}.{group.name}.safetensors"
            metadata = {
                "group": group.name,
                "elements": json.dumps(group.names),
                "data": data.name,
                "seconds": f"{elapsed:.2f}",
            }
            tmp = path.with_suffix(".tmp")
            save_file({"features": copies.features, "labels": copies.labels}, str(tmp), metadata=metadata)
            tmp.replace(path)  # atomic: a killed run never leaves a half-written cache file
        return copies

"""The feature cache: copies of transformed images by reindexing, subgroups from a d4 cache,
safetensors on disk, and keys that follow the backbone's weights."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.backbones.datasets import ImageSet, fashion_mnist
from app.backbones.efficientnet import EfficientNetLite
from app.equivariance import EquivariantModel, image_group
from app.tasks.classify.training.features import FeatureCache, extract_features, transformed, use_fast_cpu_layout


@functools.cache
def tiny_backbone() -> EfficientNetLite:
    torch.manual_seed(0)
    backbone = EfficientNetLite(0, pretrained=False, input_size=32).eval()
    use_fast_cpu_layout(backbone)  # ~10x faster on the CPU; comparisons stay within one layout
    return backbone


@functools.cache
def images(n: int = 6) -> ImageSet:
    return fashion_mnist("test").subset(range(n))


@pytest.mark.parametrize("group_name", ["c4", "d4"])
def test_copies_of_a_transformed_image_are_a_reordering(group_name: str) -> None:
    """Copy g of h·x is copy g*h of x: checked against a real forward pass on h·x."""
    group, backbone = image_group(group_name), tiny_backbone()
    copies = extract_features(backbone, group, images(), progress=False)
    x = images().pixels(range(len(images())), 32)
    h = torch.arange(len(images())) % group.order
    moved = torch.stack([group.act(x[i], int(h[i])) for i in range(len(x))])
    with torch.inference_mode():
        direct, _ = EquivariantModel(backbone.encode, backbone.head, group).encode_copies(moved)
    torch.testing.assert_close(transformed(copies.features, group, h), direct, rtol=1e-4, atol=1e-5)


def test_a_d4_cache_serves_c4(tmp_path: Path) -> None:
    cache, backbone = FeatureCache(tmp_path), tiny_backbone()
    d4 = cache.load_or_compute(backbone, image_group("d4"), images(), progress=False)
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".safetensors"]  # never a pickle
    assert torch.equal(load_file(str(files[0]))["features"], d4.features)
    c4 = cache.load_or_compute(backbone, image_group("c4"), images(), progress=False)
    assert list(tmp_path.iterdir()) == files  # served from the d4 file, nothing computed
    assert torch.equal(c4.features, d4.features[:4]) and c4.group.name == "c4"
    assert torch.equal(cache.load_or_compute(backbone, image_group("vflip"), images(), progress=False).features[1],
                       d4.features[image_group("d4").names.index("vflip")])  # fmt: skip


def test_cache_key_follows_weights_and_data() -> None:
    torch.manual_seed(1)
    other = EfficientNetLite(0, pretrained=False, input_size=32)
    assert FeatureCache.key(tiny_backbone(), images()) != FeatureCache.key(other, images())
    assert FeatureCache.key(tiny_backbone(), images()) != FeatureCache.key(tiny_backbone(), images(5))
    other.load_state_dict(tiny_backbone().state_dict())
    other.replace_head(["a", "b", "c"])  # a new head does not change the features
    assert FeatureCache.key(tiny_backbone(), images()) == FeatureCache.key(other, images())

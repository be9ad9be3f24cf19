"""EquivariantModel: exact invariance/equivariance for every group x method x backbone family,
and the fused pass against the unfused reference definition."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from app.backbones.efficientnet import EfficientNetLite
from app.backbones.torchvision_cnn import TorchvisionClassifier
from app.equivariance import IMAGE_GROUPS, EquivariantModel, LambdaNet, Method, PermutationGroup, image_group

METHODS = [m.value for m in Method]
COMBINING = ["equitune", "equizero", "lambda"]  # vanilla is not invariant, by design


@functools.cache
def backbone(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "efficientnet_lite":
        return EfficientNetLite(0, pretrained=False).eval()
    return TorchvisionClassifier("resnet18", num_classes=10).eval()


def wrap(family: str, group_name: str) -> EquivariantModel:
    b = backbone(family)
    return EquivariantModel(b.encode, b.head, image_group(group_name), lambda_net=LambdaNet(b.feature_dim)).eval()


@pytest.mark.parametrize("family", ["efficientnet_lite", "torchvision"])
@pytest.mark.parametrize("group_name", IMAGE_GROUPS)
def test_invariance_and_fused_equals_reference(family: str, group_name: str) -> None:
    model = wrap(family, group_name)
    group = model.group
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        outputs = {m: model.predict(x, m) for m in METHODS}
        for method in METHODS:
            torch.testing.assert_close(outputs[method].output, model.reference(x, method), rtol=1e-4, atol=1e-5)
        for g in range(group.order):
            xg = group.act(x, g)
            for method in COMBINING:
                moved = model.predict(xg, method)
                torch.testing.assert_close(moved.output, outputs[method].output, rtol=1e-4, atol=1e-5)
                # the diagnostics move with the input: copy h of gx is copy h*g of x
                perm = torch.tensor([group.compose(h, g) for h in range(group.order)])
                torch.testing.assert_close(moved.weights, outputs[method].weights[perm], rtol=1e-4, atol=1e-6)


def test_vanilla_is_not_invariant_so_the_test_above_can_fail() -> None:
    model = wrap("torchvision", "c4")
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        a = model(x, "vanilla")
        b = model(torch.rot90(x, 1, (-2, -1)), "vanilla")
    assert (a - b).abs().max() > 1e-3


class DenseNet(nn.Module):
    """A tiny segmentation-like net: features map [N, 8, H, W], head 1x1 conv to 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Conv2d(8, 5, 1)


@pytest.mark.parametrize("group_name", IMAGE_GROUPS)
def test_dense_outputs_are_equivariant(group_name: str) -> None:
    net = DenseNet()
    group = image_group(group_name)
    model = EquivariantModel(net.encoder, net.head, group, lambda_net=LambdaNet(8), output="dense").eval()
    x = torch.rand(2, 3, 12, 12)
    with torch.inference_mode():
        for method in COMBINING:
            base = model(x, method)
            torch.testing.assert_close(base, model.reference(x, method), rtol=1e-4, atol=1e-5)
            for g in range(group.order):
                torch.testing.assert_close(model(group.act(x, g), method), group.act(base, g), rtol=1e-4, atol=1e-5)


def test_action_outputs_permute_with_the_image() -> None:
    # A grid-world Q-network: actions (up, left, down, right). Rotating the image by 90°
    # counter-clockwise turns "up" into "left": g acts on Q-values by a gather index.
    group = image_group("c4")
    # rot90^k maps action a to a+k (mod 4); as a gather index on Q-values: (g.q)[a] = q[a-k]
    output_perms = torch.stack([(torch.arange(4) - k) % 4 for k in range(4)])
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
    head = nn.Linear(4 * 6 * 6, 4)
    model = EquivariantModel(
        encoder, head, group, lambda_net=LambdaNet(144), output="permutation", output_perms=output_perms
    ).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.inference_mode():
        for method in COMBINING:
            q = model(x, method)
            torch.testing.assert_close(q, model.reference(x, method), rtol=1e-4, atol=1e-5)
            for k in range(4):
                q_rot = model(torch.rot90(x, k, (-2, -1)), method)
                torch.testing.assert_close(q_rot, q[:, output_perms[k]], rtol=1e-4, atol=1e-5)


def test_token_permutation_group_gives_equivariant_next_token_scores() -> None:
    vocab = 7
    group = PermutationGroup("gender", [[0, 2, 1, 4, 3, 5, 6]], ["swap:man<->woman,he<->she"])
    encoder = nn.Sequential(nn.Embedding(vocab, 16), nn.Flatten(), nn.Linear(16 * 3, 16), nn.Tanh())
    head = nn.Linear(16, vocab)
    model = EquivariantModel(encoder, head, group, lambda_net=LambdaNet(16), output="permutation").eval()
    tokens = torch.randint(0, vocab, (4, 3))
    with torch.inference_mode():
        for method in COMBINING:
            scores = model(tokens, method)
            torch.testing.assert_close(scores, model.reference(tokens, method), rtol=1e-4, atol=1e-5)
            swapped = model(group.act(tokens, 1), method)
            torch.testing.assert_close(swapped, group.act_scores(scores, 1), rtol=1e-4, atol=1e-5)


def test_constant_input_gives_finite_outputs() -> None:
    model = wrap("torchvision", "d4")
    with torch.inference_mode():
        out = model.predict(torch.zeros(1, 3, 16, 16), "lambda")
    assert torch.isfinite(out.output).all()


@pytest.mark.parametrize("group_name", ["c4", "d4"])
def test_equizero_stays_equivariant_for_inputs_the_group_fixes(group_name: str) -> None:
    """A rot90-symmetric image gives tied copies: picking the first of them would not be
    equivariant for dense outputs; sharing the weight among them is."""
    torch.manual_seed(3)
    net = DenseNet()
    group = image_group(group_name)
    model = EquivariantModel(net.encoder, net.head, group, output="dense").eval()
    c4 = image_group("c4")
    seed = torch.rand(2, 3, 12, 12)
    x = sum(c4.act(seed, g) for g in range(4))  # fixed by every rotation
    with torch.inference_mode():
        base = model.predict(x, "equizero")
        assert (base.weights > 0).sum(0).min() >= 4  # the four rotations tie and share the weight
        for g in range(group.order):
            moved = model(group.act(x, g), "equizero")
            torch.testing.assert_close(moved, group.act(base.output, g), rtol=1e-4, atol=1e-5)

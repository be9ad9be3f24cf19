"""The trainer: it learns on real data, keeps the model exactly invariant, trains equizero
straight-through, and leaves nothing in train mode."""

from __future__ import annotations

import functools

import pytest
import torch

from app.backbones.datasets import ImageSet, load_splits
from app.backbones.efficientnet import EfficientNetLite
from app.equivariance import EquivariantModel, LambdaNet, Method, ZeroLoss, image_group
from app.tasks.classify.training.features import CopyFeatures, extract_features, use_fast_cpu_layout
from app.tasks.classify.training.trainer import (
    TrainConfig,
    objective_loss,
    train_end_to_end,
    train_on_features,
    validation_accuracy,
)


@functools.cache
def splits(n_train: int = 64, n_val: int = 32) -> tuple[ImageSet, ImageSet]:
    s = load_splits("fashion-mnist", train_size=n_train, val_size=n_val, seed=0)
    return s.train, s.val


def tiny_backbone(seed: int = 0) -> EfficientNetLite:
    torch.manual_seed(seed)
    backbone = EfficientNetLite(0, pretrained=False, input_size=32).eval()
    backbone.replace_head([str(i) for i in range(10)])
    use_fast_cpu_layout(backbone)  # ~10x faster on the CPU; the tests compare within one layout
    return backbone


def full_loss(copies: CopyFeatures, head: torch.nn.Module, lambda_net: LambdaNet, config: TrainConfig) -> float:
    with torch.no_grad():
        aligned = head(copies.features)
        return float(
            objective_loss(aligned, lambda_net(copies.features), copies.labels, config.objective, config.zero_loss)
        )


@pytest.mark.slow
def test_trainer_lowers_the_loss_on_real_data() -> None:
    """Real EfficientNet-Lite0 (ImageNet weights), 256 real Fashion-MNIST images, c4, λ-equitune."""
    train, val = splits(256, 128)
    torch.manual_seed(0)
    backbone = EfficientNetLite(0, input_size=32)
    backbone.replace_head(train.classes)
    use_fast_cpu_layout(backbone)
    group = image_group("c4")
    train_copies = extract_features(backbone, group, train, progress=False)
    val_copies = extract_features(backbone, group, val, progress=False)
    lambda_net = LambdaNet(backbone.feature_dim)
    config = TrainConfig(epochs=15, patience=15, batch_size=64, progress=False)
    before = full_loss(train_copies, backbone.classifier, lambda_net, config)
    result = train_on_features(train_copies, val_copies, backbone.classifier, lambda_net, config)
    after = full_loss(train_copies, backbone.classifier, lambda_net, config)
    assert after < 0.6 * before, (before, after)
    assert result.best_val_accuracy > 0.5 > result.initial_val_accuracy  # 10 classes: chance is 0.1
    # the restored state is the best one, and nothing is left in train mode
    assert validation_accuracy(val_copies, backbone.classifier, lambda_net, config) == result.best_val_accuracy
    assert not backbone.classifier.training and not lambda_net.training


@pytest.mark.parametrize("group_name", ["c4", "d4"])
def test_a_trained_lambda_net_keeps_the_model_exactly_invariant(group_name: str) -> None:
    train, val = splits()
    group, backbone = image_group(group_name), tiny_backbone()
    lambda_net = LambdaNet(backbone.feature_dim)
    before = {k: v.clone() for k, v in lambda_net.state_dict().items()}
    config = TrainConfig(epochs=3, patience=3, batch_size=16, lr=1e-2, val_transform="random", progress=False)
    train_on_features(
        extract_features(backbone, group, train, progress=False),
        extract_features(backbone, group, val, progress=False),
        backbone.classifier,
        lambda_net,
        config,
    )
    assert any(not torch.equal(before[k], v) for k, v in lambda_net.state_dict().items())  # λ did train
    model = EquivariantModel(backbone.encode, backbone.head, group, lambda_net=lambda_net).eval()
    x = val.pixels(range(4), 32)
    methods = ("equitune", "equizero", "lambda")
    with torch.inference_mode():
        upright = model.copies(x)
        for g in range(group.order):
            moved = model.copies(group.act(x, g))
            for method in methods:
                expected = model.combine(upright, method).output
                torch.testing.assert_close(model.combine(moved, method).output, expected, rtol=1e-4, atol=1e-5)


def test_equizero_trains_straight_through() -> None:
    """Forward = the selected copy's loss; gradient = the same to every copy (equitune's path)."""
    aligned = torch.randn(4, 3, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    loss = objective_loss(aligned, None, labels, Method.EQUIZERO, ZeroLoss.ENTROPY)
    selected = torch.stack([aligned[int(s), i] for i, s in enumerate(_selected(aligned))])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(selected, labels))
    loss.backward()
    assert aligned.grad is not None and aligned.grad.abs().sum() > 0
    for g in range(1, 4):
        torch.testing.assert_close(aligned.grad[g], aligned.grad[0])


def _selected(aligned: torch.Tensor) -> torch.Tensor:
    p = aligned.detach().softmax(-1)
    return (-(p * p.log()).sum(-1)).argmin(0)


def test_lambda_net_needs_the_lambda_objective() -> None:
    with pytest.raises(ValueError, match="lambda objective"):
        TrainConfig(objective=Method.EQUITUNE, train_lambda=True)


def test_fine_tuning_the_backbone_keeps_it_in_eval_mode() -> None:
    """Backbone fine-tuning: its weights move, BatchNorm statistics and dropout do not."""
    train, val = splits(16, 8)
    backbone, group = tiny_backbone(), image_group("c4")
    bn_mean = backbone.trunk.bn1.running_mean.clone()
    conv = backbone.trunk.conv_stem.weight.clone()
    config = TrainConfig(train_backbone=True, epochs=1, patience=1, batch_size=8, lr=1e-2, progress=False)
    lambda_net = LambdaNet(backbone.feature_dim)
    result = train_end_to_end(backbone, lambda_net, group, train, val, config)
    assert result.epochs_run == 1
    assert not backbone.training and not any(m.training for m in backbone.modules())
    assert torch.equal(backbone.trunk.bn1.running_mean, bn_mean)  # BatchNorm never in train mode
    if result.best_epoch == 1:  # the trained state was kept: the weights moved
        assert not torch.equal(backbone.trunk.conv_stem.weight, conv)

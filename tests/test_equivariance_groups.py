"""Group axioms, names, and the fused actions against the per-element reference actions."""

from __future__ import annotations

import itertools

import pytest
import torch

from app.equivariance import IMAGE_GROUPS, PermutationGroup, image_group

ORDERS = {"identity": 1, "c4": 4, "hflip": 2, "vflip": 2, "rot180": 2, "d4": 8}


@pytest.mark.parametrize("name", IMAGE_GROUPS)
def test_image_group_axioms(name: str) -> None:
    group = image_group(name)
    n = group.order
    assert n == ORDERS[name]
    assert group.names[0] == "identity" and len(set(group.names)) == n
    x = torch.randn(2, 3, 6, 6)
    for g, h in itertools.product(range(n), repeat=2):
        # closure + the table agrees with composing the actions (h first, then g)
        assert torch.equal(group.act(group.act(x, h), g), group.act(x, group.compose(g, h)))
    for g in range(n):
        assert group.compose(g, group.inverse(g)) == 0 == group.compose(group.inverse(g), g)
        assert group.compose(0, g) == g == group.compose(g, 0)
        assert torch.equal(group.act(group.act(x, g), group.inverse(g)), x)
    for a, b, c in itertools.product(range(n), repeat=3):
        assert group.compose(group.compose(a, b), c) == group.compose(a, group.compose(b, c))


def test_image_group_element_names_describe_the_action() -> None:
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    d4 = image_group("d4")
    assert torch.equal(d4.act(x, d4.element("rot90").index), torch.rot90(x, 1, (-2, -1)))
    assert torch.equal(d4.act(x, d4.element("hflip").index), x.flip(-1))
    assert torch.equal(d4.act(x, d4.element("vflip").index), x.flip(-2))  # a real flip, not rot180
    assert torch.equal(d4.act(x, d4.element("rot180").index), x.flip(-1).flip(-2))
    assert torch.equal(image_group("vflip").act(x, 1), x.flip(-2))
    with pytest.raises(KeyError):
        d4.element("rot45")


@pytest.mark.parametrize("name", IMAGE_GROUPS)
def test_fused_expand_equals_per_element_actions(name: str) -> None:
    group = image_group(name)
    x = torch.randn(3, 2, 5, 5)
    expanded = group.expand(x)
    assert expanded.shape == (group.order * 3, 2, 5, 5)
    reference = torch.cat([group.act(x, g) for g in range(group.order)])
    assert torch.equal(expanded, reference)  # copy-major: rows g*B..(g+1)*B are copy g


@pytest.mark.parametrize("name", IMAGE_GROUPS)
def test_invert_dense_undoes_each_copy(name: str) -> None:
    group = image_group(name)
    y = torch.randn(4, 2, 5, 5)
    copies = group.expand(y).reshape(group.order, 4, 2, 5, 5)
    restored = group.invert_dense(copies)
    assert torch.equal(restored, y.expand(group.order, *y.shape))


def test_rotations_need_square_inputs_flips_do_not() -> None:
    with pytest.raises(ValueError, match="square"):
        image_group("c4").expand(torch.randn(1, 3, 4, 6))
    assert image_group("hflip").expand(torch.randn(1, 3, 4, 6)).shape == (2, 3, 4, 6)


def test_unknown_group_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown image group"):
        image_group("c8")


def swap_group() -> PermutationGroup:
    # ids 0..5; two commuting swaps: 1<->2 and 3<->4 (think man<->woman, he<->she)
    return PermutationGroup("demo", [[0, 2, 1, 3, 4, 5], [0, 1, 2, 4, 3, 5]], ["swap:1<->2", "swap:3<->4"])


def test_permutation_group_closure_and_axioms() -> None:
    group = swap_group()
    assert group.order == 4  # Z2 x Z2
    ids = torch.tensor([[0, 1, 3, 5], [2, 4, 4, 1]])
    for g, h in itertools.product(range(group.order), repeat=2):
        assert torch.equal(group.act(group.act(ids, h), g), group.act(ids, group.compose(g, h)))
    for g in range(group.order):
        assert torch.equal(group.act(group.act(ids, g), group.inverse(g)), ids)
    assert torch.equal(group.expand(ids), torch.cat([group.act(ids, g) for g in range(group.order)]))


def test_permutation_group_scores_are_consistent_with_relabelling() -> None:
    # A "model" that puts all its score on its input id is equivariant by construction:
    # M(g . t) must equal g . M(t), and invert_scores must undo g on each copy.
    group = PermutationGroup("cycle", [[1, 2, 0, 3]], ["cycle"])
    assert group.order == 3
    t = torch.tensor([0, 1, 2, 3])
    onehot = torch.nn.functional.one_hot
    for g in range(group.order):
        assert torch.equal(onehot(group.act(t, g), 4).float(), group.act_scores(onehot(t, 4).float(), g))
    copies = onehot(group.expand(t[None]), 4).float().reshape(group.order, 1, 4, 4)
    assert torch.equal(group.invert_scores(copies), onehot(t, 4).float().expand(group.order, 1, 4, 4))


def test_permutation_group_rejects_non_permutations() -> None:
    with pytest.raises(ValueError, match="not a permutation"):
        PermutationGroup("bad", [[0, 0, 1]], ["bad"])


def test_the_torch_free_group_names_are_the_groups() -> None:
    from app.equivariance import IMAGE_GROUP_NAMES

    assert IMAGE_GROUP_NAMES == IMAGE_GROUPS

"""Finite groups and their actions on tensors.

Every group here is a finite permutation group: each element ``g`` is stored as a *gather
index* ``perm[g]`` over some index set (the pixels of an ``H x W`` grid, the ids of a
vocabulary, the actions of an agent) such that

    (g . v)[i] = v[perm[g][i]]        (acting on a vector indexed by that set).

Storing elements this way buys three things:

* the group structure (composition table, inverses, identity) is *computed* by composing
  permutations, so the axioms hold by construction and are checked in tests instead of
  being typed in by hand;
* acting with all ``|G|`` elements at once is a single ``index_select``/``gather``, so the
  fused expand ``[B, ...] -> [|G|*B, ...]`` and the inverse map on outputs have no Python
  loop over group elements on the hot path;
* a new group (word swaps, verb swaps, action swaps) is just a new table of permutations.

The element order is fixed: index 0 is always the identity, so the identity copy of a fused
pass is the vanilla model's output.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "IMAGE_GROUPS",
    "FiniteGroup",
    "GroupElement",
    "ImageGroup",
    "PermutationGroup",
    "image_group",
]


@dataclass(frozen=True)
class GroupElement:
    """One element of a finite group: its position in the group and a readable name."""

    index: int
    name: str


def _compose_tables(perms: Tensor) -> tuple[Tensor, Tensor]:
    """Cayley table and inverses of the permutations ``perms`` ([n, N] gather indices).

    With ``(g . v) = v[perm[g]]`` we have ``(g . (h . v)) = v[perm[h][perm[g]]]``, so the
    product ``g*h`` has gather index ``perm[h][perm[g]]``.
    """
    n = perms.shape[0]
    lookup = {tuple(p.tolist()): i for i, p in enumerate(perms)}
    if len(lookup) != n:
        raise ValueError("group elements must be distinct permutations")
    table = torch.empty(n, n, dtype=torch.long)
    for g in range(n):
        for h in range(n):
            key = tuple(perms[h][perms[g]].tolist())
            if key not in lookup:
                raise ValueError("elements are not closed under composition")
            table[g, h] = lookup[key]
    identity = lookup.get(tuple(range(perms.shape[1])))
    if identity != 0:
        raise ValueError("element 0 must be the identity")
    inverse = torch.tensor([int((table[g] == 0).nonzero()[0]) for g in range(n)])
    return table, inverse


class FiniteGroup:
    """A finite group, represented by the action of its elements on a probe index set.

    Subclasses decide what the group acts on (images, token ids, ...) by turning the
    abstract element into concrete gather indices for a given tensor shape.
    """

    def __init__(self, name: str, element_names: Sequence[str], probe_perms: Tensor) -> None:
        if len(element_names) != probe_perms.shape[0]:
            raise ValueError("one name per element is required")
        self.name = name
        self.elements = tuple(GroupElement(i, n) for i, n in enumerate(element_names))
        self.table, self.inverse_index = _compose_tables(probe_perms.long())

    # -- group structure ---------------------------------------------------------------
    @property
    def order(self) -> int:
        return len(self.elements)

    def __len__(self) -> int:
        return self.order

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.elements]

    def compose(self, g: int, h: int) -> int:
        """Index of ``g*h`` (apply ``h`` first, then ``g``)."""
        return int(self.table[g, h])

    def inverse(self, g: int) -> int:
        return int(self.inverse_index[g])

    def element(self, name_or_index: str | int) -> GroupElement:
        if isinstance(name_or_index, int):
            return self.elements[name_or_index]
        for e in self.elements:
            if e.name == name_or_index:
                return e
        raise KeyError(f"{self.name} has no element {name_or_index!r}; it has {self.names}")

    def act(self, x: Tensor, g: int) -> Tensor:
        """Reference (unfused) action of element ``g`` on an input; subclasses define it."""
        raise NotImplementedError

    def expand(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [|G|*B, ...]``, copy-major, in one op; subclasses define it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, elements={self.names})"

    # -- helpers shared by subclasses ---------------------------------------------------
    @staticmethod
    def _gather_copies(x: Tensor, perms: Tensor, dim: int) -> Tensor:
        """``[B, ..., N, ...] -> [n*B, ..., N, ...]``: copy ``g`` is ``x`` gathered by ``perms[g]``.

        One ``gather`` from a stride-0 view of ``x`` writes all copies straight into a
        contiguous, copy-major result, so anything computed per row reshapes to ``[n, B, ...]``.
        (An ``index_select`` along ``dim`` followed by moving the copy axis first costs an
        extra strided copy of the whole result.)
        """
        n = perms.shape[0]
        dim = dim % x.dim()
        copies = x.unsqueeze(0).expand(n, *x.shape)  # a view: no memory
        return FiniteGroup._gather_per_copy(copies, perms, dim + 1).reshape(n * x.shape[0], *x.shape[1:])

    @staticmethod
    def _gather_per_copy(y: Tensor, perms: Tensor, dim: int) -> Tensor:
        """``y`` is ``[n, B, ...]``; gather copy ``g`` along ``dim`` with ``perms[g]``."""
        dim = dim % y.dim()
        shape = [perms.shape[0]] + [1] * (y.dim() - 1)
        shape[dim] = perms.shape[1]
        index = perms.reshape(shape).expand(*y.shape[:dim], perms.shape[1], *y.shape[dim + 1 :])
        return torch.gather(y, dim, index)


# ---------------------------------------------------------------------------------------
# Image groups: subgroups of D4 acting on the last two (spatial) dimensions.
# ---------------------------------------------------------------------------------------

# An element of D4 as (k, flip): first flip left-right when ``flip``, then rotate by k*90°
# counter-clockwise (torch.rot90 on dims (-2, -1)).
_D4Element = tuple[int, bool]


def _d4_apply(x: Tensor, element: _D4Element) -> Tensor:
    k, flip = element
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x


def _d4_name(element: _D4Element) -> str:
    k, flip = element
    rot = {0: "", 1: "rot90", 2: "rot180", 3: "rot270"}[k % 4]
    if not flip:
        return rot or "identity"
    if k % 4 == 0:
        return "hflip"
    if k % 4 == 2:
        return "vflip"  # rot180 after hflip is a flip top-bottom
    return f"{rot}·hflip"


_IMAGE_GROUP_ELEMENTS: dict[str, list[_D4Element]] = {
    "identity": [(0, False)],
    "c4": [(0, False), (1, False), (2, False), (3, False)],
    "hflip": [(0, False), (0, True)],
    "vflip": [(0, False), (2, True)],
    "rot180": [(0, False), (2, False)],
    "d4": [(k, f) for f in (False, True) for k in range(4)],
}


class ImageGroup(FiniteGroup):
    """A subgroup of D4 (rotations by 90° and reflections) acting on ``[..., H, W]``.

    Rotations need square inputs (the preprocessing centre-crops to a square before the
    group acts, so that rotating an upload commutes with preprocessing).
    """

    def __init__(self, name: str) -> None:
        if name not in _IMAGE_GROUP_ELEMENTS:
            raise KeyError(f"unknown image group {name!r}; choose from {sorted(_IMAGE_GROUP_ELEMENTS)}")
        self._d4 = _IMAGE_GROUP_ELEMENTS[name]
        # A 2x2 grid already tells all eight D4 elements apart; 3x3 keeps it obvious.
        probe = torch.arange(9).reshape(3, 3)
        probe_perms = torch.stack([_d4_apply(probe, e).reshape(-1) for e in self._d4])
        super().__init__(name, [_d4_name(e) for e in self._d4], probe_perms)

    def act(self, x: Tensor, g: int) -> Tensor:
        """Reference (unfused) action of element ``g`` on ``[..., H, W]``."""
        return _d4_apply(x, self._d4[g])

    @functools.lru_cache(maxsize=32)  # noqa: B019 - a handful of (H, W, device) keys per group
    def pixel_perms(self, height: int, width: int, device: torch.device) -> Tensor:
        """``[n, H*W]`` gather indices over flattened pixels, one row per element."""
        if height != width and any(k % 2 for k, _ in self._d4):
            raise ValueError(f"group {self.name!r} rotates by 90 degrees and needs square inputs; got {height}x{width}")
        grid = torch.arange(height * width).reshape(height, width)
        return torch.stack([_d4_apply(grid, e).reshape(-1) for e in self._d4]).to(device)

    def expand(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [|G|*B, C, H, W]``, copy-major, in one gather."""
        *lead, height, width = x.shape
        perms = self.pixel_perms(height, width, x.device)
        flat = x.reshape(*lead, height * width)
        return self._gather_copies(flat, perms, dim=-1).reshape(-1, *lead[1:], height, width)

    def invert_dense(self, y: Tensor) -> Tensor:
        """Apply ``g⁻¹`` to dense per-copy outputs ``[n, B, C, H, W]`` (spatial inverse)."""
        *lead, height, width = y.shape
        perms = self.pixel_perms(height, width, y.device)[self.inverse_index.to(y.device)]
        flat = y.reshape(*lead, height * width)
        return self._gather_per_copy(flat, perms, dim=-1).reshape(y.shape)


# ---------------------------------------------------------------------------------------
# Permutation groups on a discrete set: token ids, actions, labels.
# ---------------------------------------------------------------------------------------


class PermutationGroup(FiniteGroup):
    """A group of permutations of ``{0..N-1}``, generated by the given permutations.

    ``relabel`` maps ``v -> sigma_g(v)``: it acts on *values* that are ids (token ids of
    a prompt, a chosen action). ``invert_scores`` undoes the action on per-copy score
    vectors indexed by those ids (next-token logits, Q-values), so that equivariance reads
    ``M(g . t) = g . M(t)``.
    """

    def __init__(
        self,
        name: str,
        generators: Sequence[Sequence[int] | Tensor],
        generator_names: Sequence[str],
        size: int | None = None,
    ) -> None:
        if len(generators) != len(generator_names):
            raise ValueError("one name per generator is required")
        gens = [torch.as_tensor(g, dtype=torch.long) for g in generators]
        size = size if size is not None else (int(gens[0].numel()) if gens else 1)
        for g in gens:
            if g.numel() != size or not torch.equal(g.sort().values, torch.arange(size)):
                raise ValueError(f"generator of {name!r} is not a permutation of {size} ids")
        # Breadth-first closure; each element is named by the shortest word in generators.
        identity = torch.arange(size)
        perms, names = [identity], ["identity"]
        seen = {tuple(identity.tolist()): 0}
        frontier = [0]
        while frontier:
            nxt = []
            for i in frontier:
                for gen, gname in zip(gens, generator_names, strict=True):
                    p = perms[i][gen]  # element i first, then gen
                    key = tuple(p.tolist())
                    if key not in seen:
                        seen[key] = len(perms)
                        perms.append(p)
                        names.append(gname if i == 0 else f"{gname}·{names[i]}")
                        nxt.append(len(perms) - 1)
            frontier = nxt
        self.perms = torch.stack(perms)  # gather index: (g . v)[i] = v[perms[g][i]]
        super().__init__(name, names, self.perms)
        # sigma_g as a value map: v -> sigma_g(v), consistent with the gather convention.
        self.value_maps = self.perms[self.inverse_index]
        self._device_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def size(self) -> int:
        return int(self.perms.shape[1])

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = (self.perms.to(device), self.value_maps.to(device))
        return self._device_cache[device]

    def act(self, ids: Tensor, g: int) -> Tensor:
        """Reference (unfused) action of element ``g`` on a tensor of ids."""
        return self._tables(ids.device)[1][g][ids]

    def expand(self, ids: Tensor) -> Tensor:
        """``[B, ...]`` ids -> ``[|G|*B, ...]``: every copy relabelled, in one gather."""
        value_maps = self._tables(ids.device)[1]
        return value_maps[:, ids].reshape(-1, *ids.shape[1:])

    def act_scores(self, y: Tensor, g: int) -> Tensor:
        """``g . y`` for scores ``[..., N]`` indexed by ids."""
        return y.index_select(-1, self._tables(y.device)[0][g])

    def invert_scores(self, y: Tensor) -> Tensor:
        """Apply ``g⁻¹`` to per-copy scores ``[n, B, ..., N]`` in one gather."""
        perms = self._tables(y.device)[0][self.inverse_index.to(y.device)]
        return self._gather_per_copy(y, perms, dim=-1)


def image_group(name: str) -> ImageGroup:
    """The image group called ``name`` (cached: groups are immutable)."""
    return _image_group_cached(name)


@functools.cache
def _image_group_cached(name: str) -> ImageGroup:
    return ImageGroup(name)


IMAGE_GROUPS: tuple[str, ...] = tuple(_IMAGE_GROUP_ELEMENTS)

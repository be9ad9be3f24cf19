"""The paper's math in pure torch: groups, the four combination methods, the λ-net.

Nothing here imports the rest of equiserve, and nothing here knows about HTTP.

The method names (``choices``) import without torch, and so does this package: the rest loads
on first use, so that the HTTP layer and the command lines can name a method without paying
for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .choices import IMAGE_GROUP_NAMES, METHOD_NAMES, Method, ZeroLoss

if TYPE_CHECKING:
    from .batches import group_rows, per_group
    from .groups import IMAGE_GROUPS, FiniteGroup, GroupElement, ImageGroup, PermutationGroup, image_group
    from .lambda_net import LambdaNet
    from .methods import Combined, Mixture, combine, equizero_loss, lambda_entropy
    from .model import Copies, EquivariantModel, pool_features

__all__ = [
    "IMAGE_GROUPS",
    "IMAGE_GROUP_NAMES",
    "METHOD_NAMES",
    "Combined",
    "Copies",
    "EquivariantModel",
    "FiniteGroup",
    "GroupElement",
    "ImageGroup",
    "LambdaNet",
    "Method",
    "Mixture",
    "PermutationGroup",
    "ZeroLoss",
    "combine",
    "equizero_loss",
    "group_rows",
    "image_group",
    "lambda_entropy",
    "per_group",
    "pool_features",
]

_TORCH_MODULES = ("batches", "groups", "lambda_net", "methods", "model")


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module_name in _TORCH_MODULES:
            module = importlib.import_module(f"{__name__}.{module_name}")
            if hasattr(module, name):
                value = globals()[name] = getattr(module, name)
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

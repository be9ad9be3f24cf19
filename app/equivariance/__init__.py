"""The paper's math in pure torch: groups, the four combination methods, the λ-net.

Nothing here imports the rest of equiserve, and nothing here knows about HTTP.
"""

from .groups import IMAGE_GROUPS, FiniteGroup, GroupElement, ImageGroup, PermutationGroup, image_group
from .lambda_net import LambdaNet
from .methods import Combined, Method, Mixture, ZeroLoss, combine, equizero_loss, lambda_entropy
from .model import Copies, EquivariantModel, pool_features

__all__ = [
    "IMAGE_GROUPS",
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
    "image_group",
    "lambda_entropy",
    "pool_features",
]

"""The names a request, a ``model.yaml`` or a command line picks a combination by.

Plain enums without torch, so that the HTTP layer and the command lines can import them
without loading torch; ``methods`` holds the math behind each name.
"""

from __future__ import annotations

from enum import Enum


class Method(str, Enum):
    VANILLA = "vanilla"
    EQUITUNE = "equitune"
    EQUIZERO = "equizero"
    LAMBDA = "lambda"


class ZeroLoss(str, Enum):
    """What equizero minimises over the copies."""

    NEG_MAX_PROB = "neg_max_prob"  # -max softmax probability: the paper's choice for CLIP
    ENTROPY = "entropy"  # entropy of the softmax
    NEG_MAX_VALUE = "neg_max_value"  # -max of the raw output: Q-learning's "maximise the Q-value"


METHOD_NAMES: tuple[str, ...] = tuple(m.value for m in Method)

# The image groups (``groups.IMAGE_GROUPS`` holds their elements; a test keeps the two equal).
IMAGE_GROUP_NAMES: tuple[str, ...] = ("identity", "c4", "hflip", "vflip", "rot180", "d4")

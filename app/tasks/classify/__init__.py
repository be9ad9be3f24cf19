"""Task ``classify``: images in, invariant labels out (fixed-label CNNs and zero-shot CLIP)."""

from app.tasks import TaskParts

PARTS = TaskParts(
    model=".model:ClassifyModel",
    http=".http:HTTP",
    limits=".settings:ClassifyLimits",
    cli=".cli",
    docs="docs/classify.md",
)

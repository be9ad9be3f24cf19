"""Task ``generate``: text in, text out, equivariant to demographic word swaps (EquiLM)."""

from app.tasks import TaskParts

PARTS = TaskParts(
    model=".model:GenerateModel",
    http=".http:HTTP",
    limits=".settings:GenerateLimits",
    cli=".cli",
    docs="docs/generate.md",
)

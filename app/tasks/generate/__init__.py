"""Task ``generate``: text in, text out, equivariant to demographic word swaps (EquiLM)."""

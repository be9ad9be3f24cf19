"""Task ``classify``: images in, invariant labels out (fixed-label CNNs and zero-shot CLIP)."""

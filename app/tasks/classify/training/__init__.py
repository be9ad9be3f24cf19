"""Training and evaluating λ-nets and linear heads for image models: feature cache, trainer,
evaluation tables, export to the model repository.

``python -m app train`` / ``python -m app evaluate`` (``app.tasks.classify.cli``) are thin flags
over ``pipeline``.
"""

from pathlib import Path

# Where extracted backbone features are cached (relative to the working directory).
DEFAULT_CACHE_DIR = Path("cache/features")

"""Task ``embed``: images in, rotation-invariant image embeddings out (for retrieval).

The embedding is the λ-weighted combination of the backbone features of the |G| transformed
copies, L2-normalised: ``e(x) = normalize(Σ_g w_g · f(g·x))``. The copies of ``g·x`` are those of
``x`` permuted and the weights follow their copies, so ``e(g·x) = e(x)`` (to float rounding) for
equitune and λ-equitune. It serves the image backbones of ``classify`` (EfficientNet-Lite, CLIP,
torchvision CNNs, ONNX) with their loading, runtimes and input pipelines.
"""

from app.tasks import TaskParts

PARTS = TaskParts(model=".model:EmbedModel", http=".http:HTTP", limits=".settings:EmbedLimits", docs="docs/embed.md")

"""The contract every image backbone meets, so the engine treats them all alike.

Borrowed from infinity's ``BaseTransformer``: one small class per backend, with the
pretrained model split where equiserve needs it: ``encode`` (pixels -> the features the
λ-net sees) and a ``head`` (features -> logits), plus ``warmup`` and device/dtype moves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

Head = Callable[[Tensor], Tensor]


class ImageBackbone(nn.Module):
    """A pretrained image classifier split into ``encode`` and ``head``.

    ``encode`` takes pixels ``[N, 3, S, S]`` in ``[0, 1]`` (already resized and cropped to
    ``input_size``) and normalises them itself, on the device, with the model's own mean
    and std: the engine only ever moves raw pixels.
    """

    family: str = "base"
    zero_shot: bool = False  # True when the label set comes with each request (CLIP)

    def __init__(
        self,
        *,
        name: str,
        input_size: int,
        feature_dim: int,
        labels: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.feature_dim = feature_dim
        self.labels = list(labels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.channels_last = False

    # -- what subclasses implement ----------------------------------------------------------
    def _encode(self, x: Tensor) -> Tensor:
        """Normalised pixels ``[N, 3, S, S]`` -> features ``[N, D]``."""
        raise NotImplementedError

    def head(self, features: Tensor) -> Tensor:
        """Features ``[N, D]`` -> logits ``[N, K]`` over ``self.labels``."""
        raise NotImplementedError

    def head_for(self, labels: Sequence[str] | None) -> Head:
        """The head for a request's label set; fixed-label backbones only accept their own."""
        if labels is not None and list(labels) != self.labels:
            raise ValueError(f"{self.name} has a fixed label set; it does not take labels")
        return self.head

    # -- shared ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def normalize(self, pixels: Tensor) -> Tensor:
        x = (pixels.to(self.mean.dtype) - self.mean) / self.std
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def encode(self, pixels: Tensor) -> Tensor:
        return self._encode(self.normalize(pixels))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.encode(pixels))

    def to_runtime(
        self, device: str | torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = False
    ) -> ImageBackbone:
        """Move to ``device`` in ``dtype`` for inference (eval mode; buffers stay float32)."""
        self.eval()
        self.to(device=device, dtype=dtype)
        # Normalisation runs in float32 on raw pixels, before the cast to the model dtype.
        self.mean, self.std = self.mean.float(), self.std.float()
        # channels_last speeds convolutions up on CUDA and on the CPU too (depthwise ones most;
        # bench/results/fused_cpu.json), with outputs equal up to float rounding.
        self.channels_last = channels_last
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    @torch.inference_mode()
    def warmup(self, batch_size: int) -> None:
        """Run a batch of ``batch_size`` so kernels are chosen and memory is allocated."""
        pixels = torch.rand(batch_size, 3, self.input_size, self.input_size, device=self.device)
        self.forward(pixels)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release_memory(self) -> None:
        """Give back memory a runtime keeps between calls (called when the server is idle).
        Torch's CPU allocator keeps nothing; runtimes with their own arenas override this."""


class LinearHeadBackbone(ImageBackbone):
    """A CNN whose head is one ``nn.Linear`` on pooled features (EfficientNet, ResNet, ...).

    The head can be swapped for a transfer-learned one (``replace_head``) without touching
    the pretrained trunk: that is how a model trained by ``python -m app train`` is served.
    """

    classifier: nn.Linear

    def head(self, features: Tensor) -> Tensor:
        return self.classifier(features)

    def replace_head(self, labels: Sequence[str], state: dict[str, Tensor] | None = None) -> None:
        """A new linear head over ``labels`` (random init, or loaded from ``state``)."""
        head = nn.Linear(self.feature_dim, len(labels))
        if state is not None:
            head.load_state_dict(state)
        ref = self.classifier.weight
        self.classifier = head.to(device=ref.device, dtype=ref.dtype)
        self.labels = list(labels)

    def trunk_state(self) -> dict[str, Tensor]:
        """Every weight but the head's (``classifier.*``): what a fine-tuned backbone saves."""
        return {
            k: v.detach().cpu().clone().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("classifier.")
        }

    def load_trunk(self, path: str | Path) -> None:
        """Load ``trunk_state`` from a safetensors file (written by ``python -m app train``)
        over the current weights; safetensors, so loading cannot run code."""
        from safetensors.torch import load_file

        missing, unexpected = self.load_state_dict(load_file(str(path)), strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise ValueError(f"{path} does not fit {self.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")

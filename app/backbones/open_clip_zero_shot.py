"""CLIP zero-shot classification with open_clip: the label set comes with each request.

The λ-net sees the L2-normalised image embeddings; the "head" of a label set is CLIP's
zero-shot classifier ``logit_scale.exp() * f @ T.T`` where ``T`` holds one text embedding
per label (a prompt-template ensemble, as in the CLIP paper). ``T`` costs a text-tower pass
per label and template, so it is computed once per label set and kept in a small LRU cache.

Weights: ``pretrained`` is an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...),
downloaded by open_clip into its cache, or a local checkpoint file. Either way the file is
read here with safetensors or ``torch.load(weights_only=True)`` and nothing else: open_clip's
own ``load_state_dict`` retries a failed ``torch.load`` *without* ``weights_only`` when it
sees a ``TypeError``, and a checkpoint uploaded by a user must never be fully unpickled.
"""

from __future__ import annotations

import copy
import os
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ImageBackbone

# A short ensemble from CLIP's 80 ImageNet templates (all eight are in open_clip's
# OPENAI_IMAGENET_TEMPLATES): the full 80 cost ten times the text passes per label set for
# a fraction of a point of accuracy.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
)
DEFAULT_CACHE_SIZE = 64  # label sets whose text embeddings are kept
TEXT_BATCH_SIZE = 512  # prompts per text-tower call: bounds memory for 1000 labels x 8 templates


@dataclass(frozen=True, eq=False)
class ZeroShotHead:
    """``features [N, D] -> logits [N, K]`` for one label set (CLIP's zero-shot classifier)."""

    labels: tuple[str, ...]
    text: Tensor  # [K, D] L2-normalised template-averaged text embeddings
    logit_scale: Tensor  # scalar, already exp()-ed
    logit_bias: Tensor | None  # SigLIP-style models add a learned bias

    def __call__(self, features: Tensor) -> Tensor:
        # Same expression and order as open_clip's CLIP.forward, so logits match it.
        logits = self.logit_scale * features.to(self.text.dtype) @ self.text.T
        return logits if self.logit_bias is None else logits + self.logit_bias


def _is_torchscript_archive(path: Path) -> bool:
    """What ``torch.load`` checks before dispatching to ``torch.jit.load``: a ``constants.pkl`` record."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in archive.namelist())


def load_state_dict_safely(path: str | Path) -> dict[str, Tensor]:
    """A checkpoint file's tensors, never unpickling arbitrary objects.

    ``.safetensors`` holds no code at all; anything else must load with
    ``torch.load(weights_only=True)`` (TorchScript archives such as OpenAI's original
    ``ViT-B-32.pt`` do not: convert them, or use the open_clip tag, whose Hugging Face copy is
    a plain state dict).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        checkpoint: Any = load_file(str(path), device="cpu")
    else:
        if _is_torchscript_archive(path):
            # torch.load(weights_only=True) does not refuse these: it hands them to
            # torch.jit.load, which compiles the archive's code. Not for untrusted files.
            raise ValueError(
                f"{path} is a TorchScript archive (e.g. OpenAI's original CLIP .pt); use the open_clip tag "
                "(its Hugging Face copy is a plain state dict) or convert it to safetensors"
            )
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses pickled code and TorchScript archives alike
            raise ValueError(
                f"{path} is not a plain tensor checkpoint loadable with torch.load(weights_only=True) "
                f"or safetensors: {exc}"
            ) from exc
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # open_clip training checkpoints wrap it
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if checkpoint and next(iter(checkpoint)).startswith("module."):  # saved from DistributedDataParallel
        checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return checkpoint


def load_clip_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load ``state_dict`` into an open_clip model with open_clip's own fix-ups.

    Mirrors ``open_clip.load_checkpoint`` after its file read (which we replace with the safe
    one above): third-party key conversion, old text-tower layout, scalar vs 1-d logit scale
    and bias, positional-embedding resizing; then a strict load.
    """
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state_dict = convert_state_dict(model, dict(state_dict))
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for key in ("logit_scale", "logit_bias"):
        param = getattr(model, key, None)
        if key in state_dict and param is not None and param.ndim != state_dict[key].ndim:
            state_dict[key] = state_dict[key].reshape(param.shape)
    if "logit_bias" not in state_dict and getattr(model, "logit_bias", None) is not None:
        state_dict["logit_bias"] = torch.zeros_like(state_dict["logit_scale"])
    state_dict.pop("text.transformer.embeddings.position_ids", None)  # dropped by transformers>=4.31
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    model.load_state_dict(state_dict, strict=True)


def build_clip(model_cfg: dict[str, Any]) -> nn.Module:
    """A randomly initialised open_clip ``CLIP``/``CustomTextCLIP`` from a config dict.

    This is what ``open_clip.create_model`` does once it has found the config, minus the
    weight download and loading, which we do ourselves (see the module docstring). Building
    from the dict also serves custom configs without registering them in open_clip's global
    model table (``add_model_config`` only takes JSON files). timm / Hugging Face towers are
    told not to fetch their own pretrained weights: ``pretrained=None`` means random init and
    a full checkpoint overwrites them anyway.
    """
    from open_clip import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    vision_cfg, text_cfg = cfg.setdefault("vision_cfg", {}), cfg.setdefault("text_cfg", {})
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # never download tower weights implicitly
    is_hf_text = "hf_model_name" in text_cfg
    if is_hf_text:
        text_cfg["hf_model_pretrained"] = False
    if "multimodal_cfg" in cfg:
        raise ValueError("CoCa (captioning) configs are not supported as zero-shot classifiers")
    custom_text = cfg.pop("custom_text", False) or is_hf_text
    model_class = CustomTextCLIP if custom_text else CLIP
    return model_class(**cfg)


def build_tokenizer(model_name: str, model_cfg: dict[str, Any] | None) -> Any:
    """open_clip's tokenizer for a built-in model name, or the one a custom config asks for."""
    import open_clip
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer

    if model_cfg is None:
        return open_clip.get_tokenizer(model_name)
    text_cfg = model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length, **kwargs)
    return SimpleTokenizer(context_length=context_length, **kwargs)


def resolve_pretrained(
    model_name: str, pretrained: str | None, *, custom_cfg: bool
) -> tuple[Path | None, dict[str, Any]]:
    """``pretrained`` -> (checkpoint file or None, the tag's config: mean, std, quick_gelu, ...).

    A local file wins over a tag of the same name; a tag is downloaded by open_clip (to its
    cache; this machine has no network, so offline only files work).
    """
    if pretrained is None:
        return None, {}
    if Path(pretrained).is_file():
        return Path(pretrained), {}
    if custom_cfg:
        raise ValueError(f"pretrained={pretrained!r} is not a file; tags only exist for built-in model names")
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    tag_cfg = get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        raise ValueError(
            f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {model_name!r}; "
            f"tags: {list_pretrained_tags_by_model(model_name)}"
        )
    downloaded = download_pretrained(tag_cfg)
    if not downloaded:
        raise ValueError(f"open_clip has no download location for {model_name!r} / {pretrained!r}")
    return Path(downloaded), dict(tag_cfg)


# open_clip's Hugging Face repositories of the tags our model entries name, so that asking
# whether their weights are cached does not import open_clip (and torch.hub, timm, ...) in a
# server that then skips the model. Checked against open_clip's own table (tests).
KNOWN_HF_HUB: dict[tuple[str, str], str] = {
    ("ViT-B-32", "openai"): "timm/vit_base_patch32_clip_224.openai/",
}


def hf_hub_of(model_name: str, pretrained: str) -> str:
    """The ``hf_hub`` entry of open_clip's pretrained table; imports open_clip only for a tag
    not in ``KNOWN_HF_HUB``."""
    known = KNOWN_HF_HUB.get((model_name, pretrained))
    if known is not None:
        return known
    from open_clip.pretrained import get_pretrained_cfg

    return str(get_pretrained_cfg(model_name, pretrained).get("hf_hub", ""))


def pretrained_is_local(model_name: str, pretrained: str | None) -> bool:
    """Whether ``pretrained`` loads without the network: a file, or a tag already in the cache."""
    if pretrained is None or Path(pretrained).is_file():
        return True
    from huggingface_hub import try_to_load_from_cache

    hub = hf_hub_of(model_name, pretrained)
    if not hub:
        return False
    repo_id, filename = os.path.split(hub)
    candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in candidates)


class OpenClipZeroShot(ImageBackbone):
    """An open_clip CLIP model as a zero-shot image classifier over request-given labels."""

    family = "open_clip"
    zero_shot = True

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        templates: Sequence[str] | None = None,
        default_labels: Sequence[str] = (),
        model_cfg: dict[str, Any] | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """``model_cfg`` (an open_clip config dict: embed_dim, vision_cfg, text_cfg, ...) builds
        a custom architecture instead of the built-in ``model_name``, e.g. a tiny one for
        tests; ``mean``/``std`` override the preprocessing (default: the tag's, else OpenAI's).
        """
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        cfg = copy.deepcopy(model_cfg) if model_cfg is not None else open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        checkpoint, tag_cfg = resolve_pretrained(model_name, pretrained, custom_cfg=model_cfg is not None)
        if tag_cfg.get("quick_gelu"):
            # OpenAI's weights were trained with QuickGELU; the plain "ViT-B-32" config uses
            # nn.GELU and open_clip only warns about the mismatch. Build what the weights expect.
            cfg["quick_gelu"] = True
        model = build_clip(cfg)
        if checkpoint is not None:
            load_clip_state_dict(model, load_state_dict_safely(checkpoint))

        image_size = model.visual.image_size
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if height != width:
            raise ValueError(f"{model_name}: rotations need a square input, got image_size {image_size}")
        templates = tuple(templates) if templates is not None else DEFAULT_TEMPLATES
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("templates must be a non-empty list of strings with a '{}' for the label")
        super().__init__(
            name=model_name,
            input_size=int(height),
            feature_dim=int(cfg["embed_dim"]),
            labels=default_labels,
            mean=mean if mean is not None else tag_cfg.get("mean", OPENAI_DATASET_MEAN),
            std=std if std is not None else tag_cfg.get("std", OPENAI_DATASET_STD),
        )
        self.model = model
        self.tokenizer = build_tokenizer(model_name, model_cfg)
        self.templates = templates
        self.pretrained = pretrained
        self.cache_size = cache_size
        self._heads: OrderedDict[tuple[str, ...], ZeroShotHead] = OrderedDict()
        # The engine may build heads from several threads (request handlers, the runner);
        # the lock also makes a label set's text pass happen once, not once per racer.
        self._heads_lock = threading.Lock()
        self.eval()

    # -- image side -----------------------------------------------------------------------------
    def _encode(self, x: Tensor) -> Tensor:
        return self.model.encode_image(x, normalize=True)

    # -- text side: the per-label-set head --------------------------------------------------------
    def head_for(self, labels: Sequence[str] | None) -> ZeroShotHead:
        """The zero-shot head over ``labels`` (``None``: the default labels), cached per label set."""
        if labels is None:
            if not self.labels:
                raise ValueError(f"{self.name} has no default labels: pass the labels to classify into")
            labels = self.labels
        key = tuple(labels)
        if not key or not all(isinstance(label, str) and label.strip() for label in key):
            raise ValueError("labels must be a non-empty list of non-empty strings")
        with self._heads_lock:
            head = self._heads.get(key)
            if head is None:
                head = self._build_head(key)
                self._heads[key] = head
                while len(self._heads) > self.cache_size:
                    self._heads.popitem(last=False)  # least recently used
            else:
                self._heads.move_to_end(key)
            return head

    def head(self, features: Tensor) -> Tensor:
        return self.head_for(None)(features)

    def text_embeddings(self, labels: Sequence[str]) -> Tensor:
        """``[K, D]`` L2-normalised, template-averaged text embeddings of ``labels`` (cached)."""
        return self.head_for(labels).text

    def _build_head(self, labels: tuple[str, ...]) -> ZeroShotHead:
        with torch.inference_mode():
            text = self._encode_labels(labels)
            scale = self.model.logit_scale.exp()
            bias = getattr(self.model, "logit_bias", None)
        # Inference tensors cannot be saved for backward. Clone them into normal tensors
        # (explicitly outside inference mode: the caller may be inside one) so the head stays
        # usable when gradients flow through the features, e.g. training the λ-net.
        with torch.inference_mode(False), torch.no_grad():
            return ZeroShotHead(labels, text.clone(), scale.clone(), None if bias is None else bias.clone())

    def _encode_labels(self, labels: tuple[str, ...]) -> Tensor:
        prompts = [template.format(label) for label in labels for template in self.templates]
        device = self.model.logit_scale.device
        chunks = []
        for start in range(0, len(prompts), TEXT_BATCH_SIZE):
            tokens = self.tokenizer(prompts[start : start + TEXT_BATCH_SIZE]).to(device)
            # Normalise and average in float32 even when the towers run in bf16/fp16.
            chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        per_prompt = torch.cat(chunks).reshape(len(labels), len(self.templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1).to(self.dtype)

    def clear_text_cache(self) -> None:
        with self._heads_lock:
            self._heads.clear()

    # -- device/dtype moves invalidate the cached text embeddings ---------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> OpenClipZeroShot:
        # .to()/.cuda()/.half() all go through _apply; cached heads would stay behind.
        if hasattr(self, "_heads_lock"):
            self.clear_text_cache()
        return super()._apply(fn, recurse)

    def to_runtime(
        self, device: str | torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = False
    ) -> OpenClipZeroShot:
        super().to_runtime(device, dtype, channels_last)
        self.clear_text_cache()  # the base class casts parameters in place, bypassing _apply
        return self

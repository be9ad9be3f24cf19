"""OpenClipZeroShot on tiny random-init open_clip models (no pretrained CLIP weights exist here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from app.backbones.open_clip_zero_shot import (
    DEFAULT_TEMPLATES,
    OpenClipZeroShot,
    load_state_dict_safely,
    resolve_pretrained,
)
from app.equivariance import IMAGE_GROUPS, EquivariantModel, LambdaNet, Method, image_group

# A 2-layer ViT on 32x32 images (patch 8) with a 2-layer text tower: builds in milliseconds.
TINY_VIT: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# The same with a ModifiedResNet image tower (CLIP's RN50 family): layers is a list, no patches.
TINY_RESNET: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
LABELS = ("cat", "dog", "airplane", "truck", "apple")


def tiny(cfg: dict[str, Any] = TINY_VIT, seed: int = 0, **kwargs: Any) -> OpenClipZeroShot:
    torch.manual_seed(seed)
    kwargs.setdefault("default_labels", LABELS)
    return OpenClipZeroShot("tiny-clip", model_cfg=cfg, **kwargs)


@pytest.fixture(scope="module")
def backbone() -> OpenClipZeroShot:
    return tiny()


class CountingEncodeText:
    """Wraps ``model.encode_text`` to count text-tower passes."""

    def __init__(self, backbone: OpenClipZeroShot) -> None:
        self.calls = 0
        self._inner = backbone.model.encode_text

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self._inner(*args, **kwargs)


def test_contract(backbone: OpenClipZeroShot) -> None:
    assert backbone.family == "open_clip" and backbone.zero_shot
    assert backbone.input_size == 32 and backbone.feature_dim == 32
    assert backbone.labels == list(LABELS)
    assert backbone.templates == DEFAULT_TEMPLATES and len(DEFAULT_TEMPLATES) == 8
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert torch.allclose(backbone.mean.flatten(), torch.tensor(OPENAI_DATASET_MEAN))
    assert torch.allclose(backbone.std.flatten(), torch.tensor(OPENAI_DATASET_STD))


def test_image_features_are_normalized(backbone: OpenClipZeroShot) -> None:
    with torch.inference_mode():
        features = backbone.encode(torch.rand(4, 3, 32, 32))
    assert features.shape == (4, 32)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(4))


def test_generate_embeddings_normalized_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = tiny()
    counter = CountingEncodeText(backbone)
    monkeypatch.setattr(backbone.model, "encode_text", counter)
    text = backbone.text_embeddings(["zebra", "horse"])
    assert text.shape == (2, 32) and text.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert counter.calls == 1  # all 2x8 prompts in one text-tower batch
    head = backbone.head_for(["zebra", "horse"])
    assert counter.calls == 1
    assert backbone.head_for(("zebra", "horse")) is head  # key is the tuple of labels
    assert torch.equal(head.text, text)
    backbone.head_for(["horse", "zebra"])  # order matters: another label set
    assert counter.calls == 2


def test_generate_embedding_is_the_template_ensemble(backbone: OpenClipZeroShot) -> None:
    """normalize(mean_t normalize(text(t.format(label)))) for every label."""
    with torch.inference_mode():
        expected = []
        for label in ("zebra", "horse"):
            tokens = backbone.tokenizer([t.format(label) for t in backbone.templates])
            per_template = torch.nn.functional.normalize(backbone.model.encode_text(tokens), dim=-1)
            expected.append(torch.nn.functional.normalize(per_template.mean(0), dim=-1))
    torch.testing.assert_close(backbone.text_embeddings(["zebra", "horse"]), torch.stack(expected))


def test_cache_is_a_bounded_lru(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = tiny(cache_size=2)
    counter = CountingEncodeText(backbone)
    monkeypatch.setattr(backbone.model, "encode_text", counter)
    backbone.head_for(["a"])
    backbone.head_for(["b"])
    backbone.head_for(["a"])  # hit; "b" is now the least recently used
    backbone.head_for(["c"])  # evicts "b"
    assert counter.calls == 3
    backbone.head_for(["a"])
    assert counter.calls == 3
    backbone.head_for(["b"])
    assert counter.calls == 4


def test_logits_and_label_sets(backbone: OpenClipZeroShot) -> None:
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        features = backbone.encode(x)
        logits = backbone.head(features)
        animals = backbone.head_for(["cat", "dog"])(features)
        vehicles = backbone.head_for(["truck", "airplane", "bicycle"])(features)
        swapped = backbone.head_for(["dog", "cat"])(features)
    assert logits.shape == (3, len(LABELS)) and animals.shape == (3, 2) and vehicles.shape == (3, 3)
    torch.testing.assert_close(logits, backbone.head_for(None)(features))
    torch.testing.assert_close(logits[:, :2], animals)  # same labels, same columns
    torch.testing.assert_close(swapped, animals.flip(-1))
    assert not torch.allclose(backbone.text_embeddings(["cat"]), backbone.text_embeddings(["truck"]))
    # The scale is CLIP's learned temperature: logits are scaled cosine similarities.
    scale = backbone.model.logit_scale.exp()
    assert logits.abs().max() <= scale + 1e-4


def test_matches_open_clip_forward() -> None:
    """With one template our head is open_clip's own image-text logits."""
    backbone = tiny(templates=["a photo of a {}."])
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        image_features, text_features, scale = backbone.model(
            backbone.normalize(x), backbone.tokenizer([f"a photo of a {label}." for label in LABELS])
        )
        torch.testing.assert_close(backbone(x), scale * image_features @ text_features.T)


def test_no_default_labels_and_bad_inputs() -> None:
    backbone = tiny(default_labels=())
    features = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    with pytest.raises(ValueError, match="no default labels"):
        backbone.head(features)
    with pytest.raises(ValueError, match="non-empty"):
        backbone.head_for([])
    with pytest.raises(ValueError, match="non-empty"):
        backbone.head_for(["cat", " "])
    assert backbone.head_for(["cat"])(features).shape == (2, 1)
    with pytest.raises(ValueError, match="templates"):
        tiny(templates=["no placeholder"])
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenClipZeroShot("no-such-model")


@pytest.mark.parametrize("group_name", IMAGE_GROUPS)
@pytest.mark.parametrize("method", list(Method))
def test_equivariant_zero_shot(backbone: OpenClipZeroShot, group_name: str, method: Method) -> None:
    group = image_group(group_name)
    torch.manual_seed(1)
    lambda_net = LambdaNet(backbone.feature_dim)
    model = EquivariantModel(backbone.encode, backbone.head_for(LABELS[:4]), group, lambda_net=lambda_net).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        out = model(x, method)
        assert out.shape == (3, 4)
        torch.testing.assert_close(out, model.reference(x, method), atol=1e-5, rtol=1e-5)
        if method is Method.VANILLA:
            return
        for g in range(group.order):
            torch.testing.assert_close(model(group.act(x, g), method), out, atol=1e-5, rtol=1e-5)


def test_modified_resnet_tower() -> None:
    backbone = tiny(TINY_RESNET)
    group = image_group("c4")
    model = EquivariantModel(backbone.encode, backbone.head, group, lambda_net=LambdaNet(32)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        out = model(x, Method.LAMBDA)
        assert backbone.encode(x).shape == (2, 32)
        torch.testing.assert_close(model(group.act(x, 1), Method.LAMBDA), out, atol=1e-5, rtol=1e-5)


def test_load_local_checkpoint(tmp_path: Path, backbone: OpenClipZeroShot) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(state, tmp_path / "tiny.safetensors")
    # open_clip training checkpoints: {"state_dict": ...} with DistributedDataParallel "module." keys
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "tiny.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        expected = backbone(x)
        for name in ("tiny.safetensors", "tiny.pt"):
            loaded = tiny(seed=123, pretrained=str(tmp_path / name))
            torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)


class NotATensor:
    """Any class outside torch's weights-only allowlist stands for arbitrary pickled code."""


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated; OpenAI's files are not
def test_checkpoints_are_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_safely(path)
    with pytest.raises(ValueError, match="weights_only"):
        tiny(pretrained=str(path))
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))  # OpenAI's original .pt format
    with pytest.raises(ValueError, match="TorchScript"):
        load_state_dict_safely(scripted)


def test_pretrained_tag_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tags resolve through open_clip's registry and downloader (faked: no network here)."""
    import open_clip.pretrained

    fake = tmp_path / "open_clip_model.safetensors"
    fake.write_bytes(b"")
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", lambda cfg, **_: str(fake))
    path, tag_cfg = resolve_pretrained("ViT-B-32", "openai", custom_cfg=False)
    assert path == fake
    assert tag_cfg["quick_gelu"]  # OpenAI's weights need QuickGELU: the backbone builds it so
    assert resolve_pretrained("ViT-B-32", None, custom_cfg=False) == (None, {})
    with pytest.raises(ValueError, match="neither a file nor"):
        resolve_pretrained("ViT-B-32", "no-such-tag", custom_cfg=False)
    with pytest.raises(ValueError, match="built-in"):
        resolve_pretrained("tiny-clip", "openai", custom_cfg=True)


def test_to_runtime_recomputes_text_in_new_dtype() -> None:
    backbone = tiny()
    assert backbone.text_embeddings(["cat"]).dtype == torch.float32
    backbone.to_runtime("cpu", torch.bfloat16)
    assert backbone.dtype == torch.bfloat16
    assert backbone.text_embeddings(["cat"]).dtype == torch.bfloat16
    with torch.inference_mode():
        backbone.warmup(2)
        logits = backbone(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, len(LABELS)) and torch.isfinite(logits).all()


def test_head_works_with_grad_through_features(backbone: OpenClipZeroShot) -> None:
    """The cached text embeddings are no inference tensors: training λ through the head works."""
    with torch.inference_mode():
        backbone.head_for(["cat", "truck"])  # first built inside inference mode, as the engine does
    with torch.no_grad():
        features = backbone.encode(torch.rand(2, 3, 32, 32))
    features.requires_grad_(True)
    backbone.head(features).sum().backward()
    backbone.head_for(["cat", "truck"])(features).sum().backward()
    assert features.grad is not None


def test_known_hub_table_is_open_clips_and_checking_the_cache_imports_no_open_clip() -> None:
    import subprocess
    import sys

    from open_clip.pretrained import get_pretrained_cfg

    from app.backbones.open_clip_zero_shot import KNOWN_HF_HUB, hf_hub_of

    for (name, tag), hub in KNOWN_HF_HUB.items():
        assert get_pretrained_cfg(name, tag)["hf_hub"] == hub
    assert hf_hub_of("ViT-B-16", "openai") == get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"]  # the fallback
    probe = (
        "import sys\n"
        "from app.tasks import weights_are_local\n"
        "from pathlib import Path\n"
        "weights_are_local(Path('models'), 'clip-vit-b32-c4')\n"
        "print('open_clip' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr

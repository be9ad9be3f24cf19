"""How generate speaks HTTP: ``POST /v1/models/{name}/generate`` takes JSON and answers JSON, or,
with ``"stream": true``, server-sent events (one ``token`` event per generated token, then ``done``
with the whole answer; the edge does the streaming). The Open Inference Protocol takes
``text_input`` and gives ``text_output``. No torch here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from app.oip import (
    InferBody,
    TensorError,
    TensorSchema,
    TensorSpec,
    V2Mapping,
    checked_inputs,
    object_array,
    parameter,
    text_element,
)
from app.tasks.http import Served, TaskHttp, constrained, method_keywords

from .messages import GenerateOutput, GenerateRequest, TokenEvent


def prompt_keywords(served: Served) -> dict[str, Any]:
    """A prompt's length; its tokens are counted by the tokenizer, which no JSON schema can."""
    limits = served.limits
    return {
        "maxLength": limits.max_prompt_chars,
        "description": f"text to continue, as is (no chat template): at most {limits.max_prompt_chars} characters "
        f"and {limits.max_prompt_tokens} tokens, and with max_new_tokens within the model's context of "
        f"{served.card['context']} tokens (413)",
    }


def option_keywords(served: Served) -> dict[str, dict[str, Any]]:
    """The options' limits for this model (the same for /v1 fields and /v2 parameters)."""
    return {
        "max_new_tokens": {"maximum": served.limits.max_new_tokens},
        "top_k": {"maximum": served.card["vocab_size"]},
        "method": method_keywords(served),
    }


class GenerateV2(V2Mapping):
    """``text_input`` (BYTES [1]: one prompt) -> ``text_output`` (BYTES [1]), with the
    copies' weights and why it stopped."""

    parameters = frozenset({"method", "max_new_tokens", "temperature", "top_k", "seed", "relaxed"})

    def inputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        return [TensorSpec("text_input", "BYTES", (1,))]

    def input_schema(self, spec: TensorSpec, card: dict[str, Any], limits: Any) -> TensorSchema:
        prompt = {"type": "string", "minLength": 1, **prompt_keywords(Served(card, limits, 0))}
        return TensorSchema([{"const": 1}], prompt)

    def outputs(self, card: dict[str, Any]) -> list[TensorSpec]:
        return [
            TensorSpec("text_output", "BYTES", (1,)),
            TensorSpec("lambda", "FP32", (1, len(card["transforms"]))),
            TensorSpec("finish_reason", "BYTES", (1,)),
        ]

    def request(self, body: InferBody, card: dict[str, Any], limits: Any, wanted: set[str]) -> GenerateRequest:
        self.check_parameters(body)
        tensors = checked_inputs(body, {s.name: s for s in self.inputs(card)})
        if not tensors:
            raise TensorError("send the input 'text_input' (BYTES [1])")
        temperature = parameter(body, "temperature", int, float)
        return GenerateRequest(
            text_element(tensors[0].data[0], "text_input"),
            parameter(body, "max_new_tokens", int),
            parameter(body, "method", str),
            None if temperature is None else float(temperature),
            parameter(body, "top_k", int),
            parameter(body, "seed", int),
            parameter(body, "relaxed", bool),
        )

    def tensors(self, output: GenerateOutput) -> dict[str, tuple[str, np.ndarray]]:
        return {
            "text_output": ("BYTES", object_array([output.text.encode()])),
            "lambda": ("FP32", np.array([[t.weight for t in output.transforms]], np.float32)),
            "finish_reason": ("BYTES", object_array([output.finish_reason.encode()])),
        }


class GenerateHttp(TaskHttp[GenerateRequest, GenerateOutput]):
    task = "generate"
    summary = "Generate text with a language model made fair by a word-swap group (EquiLM)"
    body_type = GenerateRequest
    answer_type = GenerateOutput
    errors: ClassVar[dict[int, str]] = {
        413: "prompt too long, or max_new_tokens over the model's limit",
        422: "the body is not valid JSON, invalid fields (method, temperature, top_k, seed, schema)",
    }
    v2 = GenerateV2()
    streams = True
    stream_events: ClassVar[dict[str, type]] = {"token": TokenEvent}

    def wants_stream(self, request: GenerateRequest) -> bool:
        return request.stream

    def constrain(self, schema: dict[str, Any], served: Served) -> dict[str, Any]:
        return constrained(schema, prompt=prompt_keywords(served), **option_keywords(served))

    def examples(self, served: Served) -> list[Any]:
        prompts = ("The woman worked as", "The man was known for")
        short = [prompt[: served.limits.max_prompt_chars] for prompt in prompts]
        new_tokens = min(12, served.limits.max_new_tokens)
        return [
            {"prompt": short[0], "max_new_tokens": new_tokens, "method": served.method("lambda"), "seed": 7},
            {"prompt": short[1], "temperature": 0, "stream": True},
        ]


HTTP = GenerateHttp()

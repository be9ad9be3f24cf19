"""``POST /v1/models/{name}/generate``: fair text generation (EquiLM). No torch here.

JSON in, JSON out; or, with ``"stream": true``, server-sent events: one ``token`` event per
generated token and a final ``done`` event carrying the whole answer. Errors before the
request's batch starts (404, 413, 422, 429, 503, 504) are ordinary JSON errors with their
status; an error after the stream began is sent as an ``error`` event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.engine.engine import StreamEvent
from app.engine.errors import EngineError
from app.tasks.generate.messages import GenerateOutput, GenerateRequest

from .common import engine_of, error_responses, infer_parsed, require_api_key, timing_body

ERRORS = error_responses(
    e400="the body is not valid JSON",
    e413="prompt too long, or max_new_tokens over the model's limit",
    e422="invalid fields (method, temperature, top_k, seed, schema)",
)


class GenerateBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "The woman worked as", "max_new_tokens": 12, "method": "lambda", "seed": 7},
                {"prompt": "The man was known for", "temperature": 0, "stream": True},
            ]
        },
    )
    prompt: str = Field(min_length=1, description="text to continue, as is (no chat template)")
    max_new_tokens: int | None = Field(None, ge=1, description="tokens to generate (default: the model's)")
    method: str | None = Field(None, description="vanilla | equitune | equizero | lambda (default: the model's)")
    temperature: float | None = Field(None, ge=0, le=100, description="0 = greedy (default: the model's)")
    top_k: int | None = Field(None, ge=0, description="sample among the k most likely tokens; 0 = all")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="fixes the sample; echoed back (random if unset)")
    relaxed: bool | None = Field(None, description="R-EquiLM: general words (pronouns, ...) from the identity copy")
    stream: bool = Field(False, description="answer with server-sent events, one per token")


class GeneratedTokenBody(BaseModel):
    id: int
    text: str
    logprob: float = Field(description="log-probability under the combined distribution (before temperature)")


class TransformWeight(BaseModel):
    name: str = Field(description="the swap that made this copy, e.g. swap:man<->woman")
    weight: float = Field(alias="lambda", description="its normalised weight, averaged over the generated tokens")
    prompt: str = Field(description="the prompt as this copy read it: its swapped tokens, decoded")

    model_config = ConfigDict(populate_by_name=True)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateTiming(BaseModel):
    queue_ms: float = Field(description="time the request waited for its batch")
    inference_ms: float = Field(description="decoding of the whole batch")
    batch_size: int = Field(description="requests decoded together")


class GenerateResponse(BaseModel):
    model: str
    method: str
    group: str
    relaxed: bool
    text: str
    tokens: list[GeneratedTokenBody]
    finish_reason: str = Field(description="length | eos | cancelled")
    transforms: list[TransformWeight]
    selected_transform: str | None = Field(description="equizero: the copy chosen most often; null otherwise")
    lambda_entropy: float | None = Field(description="mean entropy (nats) of the λ-net's weights; null for vanilla")
    frame: str = Field(description="the prompt's canonical frame: sampling runs in it, so seeds are equivariant")
    seed: int
    temperature: float
    top_k: int
    usage: Usage
    timing: GenerateTiming


def generate_response(output: GenerateOutput) -> dict[str, Any]:
    r = output.result
    return {
        "model": output.model,
        "method": output.method.value,
        "group": output.group,
        "relaxed": output.relaxed,
        "text": r.text,
        "tokens": [{"id": t.id, "text": t.text, "logprob": t.logprob} for t in r.tokens],
        "finish_reason": r.finish_reason,
        "transforms": [
            {"name": name, "lambda": w, "prompt": prompt}
            for name, w, prompt in zip(output.transforms, r.weights, r.prompts, strict=True)
        ],
        "selected_transform": r.selected_transform,
        "lambda_entropy": r.lambda_entropy,
        "frame": r.frame,
        "seed": output.seed,
        "temperature": output.temperature,
        "top_k": output.top_k,
        "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.tokens)},
        "timing": timing_body(output.timing),
    }


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def build_generate_router() -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/models/{name}/generate",
        response_model=GenerateResponse,
        response_model_by_alias=True,
        tags=["inference"],
        dependencies=[Depends(require_api_key)],
        responses={
            **ERRORS,
            200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        },
        summary="Generate text with a language model made fair by a word-swap group (EquiLM)",
    )
    async def generate(name: str, body: GenerateBody, request: Request) -> Response:
        generate_request, request_id = GenerateRequest(**body.model_dump(exclude={"stream"})), request.state.request_id
        if not body.stream:
            return JSONResponse(generate_response(await infer_parsed(request, name, "generate", generate_request)))
        events = engine_of(request).stream(name, "generate", generate_request, request_id=request_id)
        try:
            first = await anext(events)  # errors while queued still get their HTTP status
        except BaseException:
            await events.aclose()
            raise

        async def sse_events() -> AsyncIterator[bytes]:
            try:
                event: StreamEvent | None = first
                while event is not None:
                    if event.kind == "token":
                        t = event.data
                        yield sse("token", {"index": t.index, "id": t.id, "text": t.text, "logprob": t.logprob,
                                            "delta": t.delta})  # fmt: skip
                    elif event.kind == "done":
                        yield sse("done", generate_response(event.data))
                    elif event.kind == "error":
                        exc = event.data
                        code, message = (exc.code, exc.message) if isinstance(exc, EngineError) else ("error", str(exc))
                        yield sse("error", {"error": {"code": code, "message": message, "request_id": request_id}})
                    event = await anext(events, None)
            finally:
                await events.aclose()  # stops decoding this request when the client left

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(sse_events(), media_type="text/event-stream", headers=headers)

    return router

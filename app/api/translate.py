"""``POST /v1/models/{name}/translate``: SCAN commands in, equivariant action sequences out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.tasks.translate.messages import TranslateOutput, TranslateRequest

from .common import error_responses, infer_parsed, require_api_key, timing_body
from .schemas import Timing

ERRORS = error_responses(
    e400="the body is not valid JSON",
    e413="too many commands (EQUISERVE_MAX_COMMANDS)",
    e422="a word outside SCAN's vocabulary, a command over EQUISERVE_MAX_COMMAND_WORDS words, an empty command, method",
)


class TranslateBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"commands": ["jump twice after walk left"], "method": "equizero"}]},
    )
    commands: list[str] = Field(min_length=1, description="SCAN commands: words separated by spaces")
    method: str | None = Field(None, description="vanilla | equitune | equizero | lambda (default: the model's)")


class TranslateTransform(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(description="the group element that made this copy, e.g. jump<->run")
    weight: float = Field(alias="lambda", description="normalised weight of this copy (sums to 1 over copies)")
    actions: str = Field(description="what this copy alone produced, mapped back to the command's words")
    finished: bool = Field(description="that translation ended within the model's max_actions")
    loss: float = Field(description="equizero's loss of that translation (lower is chosen)")


class TranslateAnswer(BaseModel):
    command: str = Field(description="the command as read (single spaces)")
    actions: str = Field(description="space-separated I_... actions, as in SCAN's files (equivariant)")
    finished: bool = Field(description="false: the model's max_actions cut the translation")
    transforms: list[TranslateTransform]
    selected_transform: str | None = Field(description="the copy equizero chose; null for other methods")
    lambda_entropy: float | None


class TranslateResponse(BaseModel):
    model: str
    method: str
    group: str
    results: list[TranslateAnswer]
    timing: Timing


def translate_response(output: TranslateOutput) -> dict[str, Any]:
    return {
        "model": output.model,
        "method": output.method.value,
        "group": output.group,
        "results": [
            {
                "command": r.command,
                "actions": r.actions,
                "finished": r.finished,
                "transforms": [
                    {"name": t.name, "lambda": t.weight, "actions": t.actions, "finished": t.finished, "loss": t.loss}
                    for t in r.transforms
                ],
                "selected_transform": r.selected_transform,
                "lambda_entropy": r.lambda_entropy,
            }
            for r in output.results
        ],
        "timing": timing_body(output.timing),
    }


def build_translate_router() -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/models/{name}/translate",
        response_model=TranslateResponse,
        response_model_by_alias=True,
        tags=["inference"],
        dependencies=[Depends(require_api_key)],
        responses=ERRORS,
        summary="Translate SCAN commands with an equivariant seq2seq model",
    )
    async def translate(name: str, body: TranslateBody, request: Request) -> Response:
        output = await infer_parsed(request, name, "translate", TranslateRequest(body.commands, body.method))
        return JSONResponse(translate_response(output))

    return router

"""``POST /v1/models/{name}/act``: environment states in, equivariant Q-values and actions out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.tasks.act.messages import ActOutput, ActRequest

from .common import error_responses, infer_parsed, require_api_key, timing_body
from .schemas import Timing

ERRORS = error_responses(
    e400="the body is not valid JSON",
    e422="wrong observation length, NaN or infinity, too many observations (EQUISERVE_MAX_OBSERVATIONS), method",
)


class ActBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"observations": [[0.02, -0.01, 0.03, 0.04]], "method": "lambda"}]},
    )
    observations: list[list[float]] = Field(
        min_length=1, description="one state per environment, as the environment's observation vector"
    )
    method: str | None = Field(None, description="vanilla | equitune | equizero | lambda (default: the model's)")


class ActTransform(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(description="the group element that made this copy, e.g. reflect")
    weight: float = Field(alias="lambda", description="normalised weight of this copy (sums to 1 over copies)")
    action: int = Field(description="the greedy action of this copy alone, mapped back to the state's frame")
    max_q: float = Field(description="max_a Q(g·s, a): what equizero compares")


class ActAnswer(BaseModel):
    q_values: list[float] = Field(description="the combined Q-values, one per action (equivariant)")
    action: int = Field(description="the greedy action: argmax of q_values")
    transforms: list[ActTransform]
    selected_transform: str | None = Field(description="the copy equizero chose; null for other methods")
    lambda_entropy: float | None


class ActResponse(BaseModel):
    model: str
    method: str
    group: str
    env: str = Field(description="the gymnasium id of the environment, e.g. CartPole-v1")
    results: list[ActAnswer]
    timing: Timing


def act_response(output: ActOutput) -> dict[str, Any]:
    return {
        "model": output.model,
        "method": output.method.value,
        "group": output.group,
        "env": output.env,
        "results": [
            {
                "q_values": r.q_values,
                "action": r.action,
                "transforms": [
                    {"name": t.name, "lambda": t.weight, "action": t.action, "max_q": t.max_q} for t in r.transforms
                ],
                "selected_transform": r.selected_transform,
                "lambda_entropy": r.lambda_entropy,
            }
            for r in output.results
        ],
        "timing": timing_body(output.timing),
    }


def build_act_router() -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/models/{name}/act",
        response_model=ActResponse,
        response_model_by_alias=True,
        tags=["inference"],
        dependencies=[Depends(require_api_key)],
        responses=ERRORS,
        summary="Act in an environment with an equivariant Q-network",
    )
    async def act(name: str, body: ActBody, request: Request) -> Response:
        output = await infer_parsed(request, name, "act", ActRequest(body.observations, body.method))
        return JSONResponse(act_response(output))

    return router

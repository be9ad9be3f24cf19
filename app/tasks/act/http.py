"""``POST /v1/models/{name}/act``: environment states in, equivariant Q-values and actions out."""

from __future__ import annotations

from typing import ClassVar

from app.tasks.http import TaskHttp

from .messages import ActOutput, ActRequest


class ActHttp(TaskHttp[ActRequest, ActOutput]):
    task = "act"
    summary = "Act in an environment with an equivariant Q-network"
    body_type = ActRequest
    answer_type = ActOutput
    errors: ClassVar[dict[int, str]] = {
        422: "the body is not valid JSON, wrong observation length, NaN or infinity, too many observations "
        "(EQUISERVE_ACT_MAX_OBSERVATIONS), method",
    }


HTTP = ActHttp()

"""``POST /v1/models/{name}/act``: environment states in, equivariant Q-values and actions out."""

from __future__ import annotations

from typing import Any, ClassVar

from app.tasks.http import Served, TaskHttp, constrained, method_keywords

from .messages import ActOutput, ActRequest


class ActHttp(TaskHttp[ActRequest, ActOutput]):
    task = "act"
    summary = "Act in an environment with an equivariant Q-network"
    body_type = ActRequest
    answer_type = ActOutput
    errors: ClassVar[dict[int, str]] = {
        413: "more observations than the model's queue holds (EQUISERVE_QUEUE_SIZE)",
        422: "the body is not valid JSON, wrong observation length, NaN or infinity, a number over "
        "EQUISERVE_ACT_MAX_ABS_VALUE in magnitude, too many observations (EQUISERVE_ACT_MAX_OBSERVATIONS), method",
    }

    def constrain(self, schema: dict[str, Any], served: Served) -> dict[str, Any]:
        dim, bound = served.card["observation_dim"], served.limits.max_abs_value
        number = {"type": "number", "minimum": -bound, "maximum": bound}
        state = {
            "type": "array",
            "items": number,
            "minItems": dim,
            "maxItems": dim,
            "description": f"a {served.card['env']} state: {dim} numbers",
        }
        observations = {"maxItems": served.max_items(served.limits.max_observations), "items": state}
        return constrained(schema, observations=observations, method=method_keywords(served))

    def examples(self, served: Served) -> list[Any]:
        dim = served.card["observation_dim"]
        state = [0.02, -0.01, 0.03, 0.04] if dim == 4 else [0.0] * dim
        return [{"observations": [state], "method": served.method("lambda")}]


HTTP = ActHttp()

"""JSON as JSON Schema reads it, for the request types' annotations (``messages.py``): they are
validated strictly (no ``"5"`` for 5, no ``1`` for ``true``), as the OpenAPI document states
their types; but JSON Schema's ``integer`` is any number without a fractional part, ``1.0`` too."""

from __future__ import annotations

from typing import Any

from pydantic import BeforeValidator


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# After a field's constraints in its ``Annotated`` (which then stay the integer's own in the schema).
INTEGRAL = BeforeValidator(_integral)

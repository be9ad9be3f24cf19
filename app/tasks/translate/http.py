"""``POST /v1/models/{name}/translate``: SCAN commands in, equivariant action sequences out."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from app.tasks.http import Served, TaskHttp, constrained, method_keywords, portable_pattern

from .messages import TranslateOutput, TranslateRequest
from .scan import COMMAND_PATTERN, translations


@functools.cache
def longest_command() -> int:
    """The words of SCAN's longest command: a word limit at least this long never binds."""
    return max(len(command.split()) for command in translations())


def command_schema(max_words: int) -> dict[str, Any]:
    """One command: SCAN's grammar (``COMMAND_PATTERN``) and, where it binds, the word limit."""
    grammar = {"pattern": portable_pattern(COMMAND_PATTERN)}
    described = {"type": "string", "description": f"a command of SCAN's grammar, at most {max_words} words"}
    if max_words >= longest_command():
        return {**described, **grammar}
    words = {"pattern": portable_pattern(rf"^\s*\S+(?:\s+\S+){{0,{max_words - 1}}}\s*$")}
    return {**described, "allOf": [grammar, words]}


class TranslateHttp(TaskHttp[TranslateRequest, TranslateOutput]):
    task = "translate"
    summary = "Translate SCAN commands with an equivariant seq2seq model"
    body_type = TranslateRequest
    answer_type = TranslateOutput
    errors: ClassVar[dict[int, str]] = {
        413: "too many commands (EQUISERVE_TRANSLATE_MAX_COMMANDS)",
        422: "the body is not valid JSON, a word outside SCAN's vocabulary, a command over "
        "EQUISERVE_TRANSLATE_MAX_COMMAND_WORDS words or outside SCAN's grammar, an empty command, method",
    }

    def constrain(self, schema: dict[str, Any], served: Served) -> dict[str, Any]:
        limits = served.limits
        commands = {
            "maxItems": served.max_items(limits.max_commands),
            "items": command_schema(limits.max_command_words),
        }
        return constrained(schema, commands=commands, method=method_keywords(served))

    def examples(self, served: Served) -> list[Any]:
        command = "jump twice after walk left" if served.limits.max_command_words >= 5 else "jump"
        return [{"commands": [command], "method": served.method("equizero")}]


HTTP = TranslateHttp()

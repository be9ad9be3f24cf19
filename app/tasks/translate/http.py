"""``POST /v1/models/{name}/translate``: SCAN commands in, equivariant action sequences out."""

from __future__ import annotations

from typing import ClassVar

from app.tasks.http import TaskHttp

from .messages import TranslateOutput, TranslateRequest


class TranslateHttp(TaskHttp[TranslateRequest, TranslateOutput]):
    task = "translate"
    summary = "Translate SCAN commands with an equivariant seq2seq model"
    body_type = TranslateRequest
    answer_type = TranslateOutput
    errors: ClassVar[dict[int, str]] = {
        413: "too many commands (EQUISERVE_TRANSLATE_MAX_COMMANDS)",
        422: "the body is not valid JSON, a word outside SCAN's vocabulary, a command over "
        "EQUISERVE_TRANSLATE_MAX_COMMAND_WORDS words, an empty command, method",
    }


HTTP = TranslateHttp()

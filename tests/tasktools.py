"""One example per registered task for the contract tests that run over every task (the engine's
admission, deadlines, drain and cancellation; the HTTP edge's auth and errors): a tiny model to
write, a valid request in-process and over HTTP, and what its answer must hold. A task without an
example here fails ``test_every_task_has_a_contract_example``."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from app.tasks.act.messages import ActOutput, ActRequest
from app.tasks.classify.messages import ClassifyOutput, ClassifyRequest, EncodedImage
from app.tasks.embed.messages import EmbedOutput, EmbedRequest
from app.tasks.generate.messages import GenerateOutput, GenerateRequest
from app.tasks.translate.messages import TranslateOutput, TranslateRequest
from tests.acttools import write_tiny_agent
from tests.generatetools import write_tiny_lm
from tests.imagetools import png_bytes, write_tiny_model
from tests.translatetools import write_tiny_translate_model


def grey_png() -> bytes:
    return png_bytes(np.full((40, 40, 3), 90, np.uint8))


def write_tiny_embedder(root: Path) -> Path:
    folder = write_tiny_model(root, "tiny-embed")
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    spec.update({"task": "embed", "methods": ["vanilla", "equitune", "lambda"], "default_method": "lambda"})
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return folder


@dataclass(frozen=True)
class TaskExample:
    model: str  # the tiny model's name
    write: Callable[[Path], Any]  # writes it into a model repository
    request: Callable[[], Any]  # a valid request of ONE batch item (in-process callers)
    body: Callable[[], dict[str, Any]]  # the same request as JSON for POST /v1/models/{model}/{task}
    check: Callable[[Any], bool]  # the answer is this task's, for that request
    invalid: Callable[[], Any]  # a request the task refuses with InvalidInput (422)
    many: Callable[[int], Any] | None = None  # a request of n items, for tasks whose requests hold several


EXAMPLES: dict[str, TaskExample] = {
    "classify": TaskExample(
        "tiny",
        write_tiny_model,
        lambda: ClassifyRequest([EncodedImage(grey_png())]),
        lambda: {"images": [{"b64": base64.b64encode(grey_png()).decode()}]},
        lambda out: (
            isinstance(out, ClassifyOutput) and abs(sum(t.weight for t in out.results[0].transforms) - 1) < 1e-5
        ),
        lambda: ClassifyRequest([EncodedImage(grey_png())], method="magic"),
        lambda n: ClassifyRequest([EncodedImage(grey_png())] * n),
    ),
    "embed": TaskExample(
        "tiny-embed",
        write_tiny_embedder,
        lambda: EmbedRequest([EncodedImage(grey_png())]),
        lambda: {"images": [{"b64": base64.b64encode(grey_png()).decode()}]},
        lambda out: isinstance(out, EmbedOutput) and abs(float(np.linalg.norm(out.results[0].embedding)) - 1) < 1e-5,
        lambda: EmbedRequest([EncodedImage(grey_png())], method="equizero"),
        lambda n: EmbedRequest([EncodedImage(grey_png())] * n),
    ),
    "generate": TaskExample(
        "tinylm",
        write_tiny_lm,
        lambda: GenerateRequest("The man worked as", max_new_tokens=2, temperature=0),
        lambda: {"prompt": "The man worked as", "max_new_tokens": 2, "temperature": 0},
        lambda out: isinstance(out, GenerateOutput) and len(out.tokens) >= 1,
        lambda: GenerateRequest("The man", temperature=-1),
    ),
    "translate": TaskExample(
        "tiny-scan",
        write_tiny_translate_model,
        lambda: TranslateRequest(["jump twice"]),
        lambda: {"commands": ["jump twice"]},
        lambda out: isinstance(out, TranslateOutput) and [r.command for r in out.results] == ["jump twice"],
        lambda: TranslateRequest(["jump and fly"]),
        lambda n: TranslateRequest(["jump twice"] * n),
    ),
    "act": TaskExample(
        "tiny-agent",
        write_tiny_agent,
        lambda: ActRequest([[0.01, 0.02, -0.03, 0.04]]),
        lambda: {"observations": [[0.01, 0.02, -0.03, 0.04]]},
        lambda out: isinstance(out, ActOutput) and len(out.results[0].q_values) == 2,
        lambda: ActRequest([[0.0, 0.0, 0.0]]),
        lambda n: ActRequest([[0.01, 0.02, -0.03, 0.04]] * n),
    ),
}


def write_every_task(root: Path) -> Path:
    for example in EXAMPLES.values():
        example.write(root)
    return root

"""The naive peer: a plain FastAPI server where one request is one forward per group element.

What a first version of the service would look like, with equiserve's own model loading,
image decoding and preprocessing (so only the serving strategy differs):

* no batching across requests, no fused pass: the request's image goes through the
  backbone once per group element in a Python loop (``EquivariantModel.reference``, the
  unfused definition), then the outputs are combined;
* ``--mode sync`` (default): a plain ``def`` endpoint, which FastAPI runs in its thread
  pool (40 threads), so concurrent requests run concurrent forwards, each with torch's
  intra-op threads: the way FastAPI's docs tell you to run blocking code;
* ``--mode async``: an ``async def`` endpoint that computes on the event loop, so
  requests are served strictly one after the other.

Run (from the repository root)::

    python bench/peers/naive_server.py --port 8001 [--model imagenet-effnet-c4] [--mode sync]

Routes: ``POST /v1/models/{model}/classify`` (multipart ``image``, optional ``method`` and
``top_k``), ``GET /health/ready``. The answer has equiserve's shape (predictions, timing
with ``batch_size`` 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Annotated, Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from fastapi import FastAPI, File, Form, HTTPException, UploadFile  # noqa: E402

from app.backbones.images import decode_image  # noqa: E402
from app.backbones.preprocess import pixels_from_uint8  # noqa: E402
from app.config import DEFAULT_MODELS_DIR  # noqa: E402
from app.tasks import load_model  # noqa: E402

MAX_PIXELS = 25_000_000


def build_app(model_name: str, models_dir: Path, mode: str, device: str = "cpu", runtime: str = "torch") -> FastAPI:
    # runtime torch: the model as a user's own server would run it; onnxruntime: equiserve's
    # CPU runtime, to tell the runtime's share of equiserve's lead from batching's.
    loaded = load_model(models_dir, model_name, device, "float32", runtime=runtime)
    model, backbone = loaded.model, loaded.backbone
    labels = backbone.labels
    with torch.inference_mode():  # one request's worth, so the first real one pays nothing extra
        model.reference(torch.rand(1, 3, backbone.input_size, backbone.input_size, device=loaded.device))

    def classify_bytes(data: bytes, method: str, top_k: int) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            array = decode_image(data, max_pixels=MAX_PIXELS, min_side=backbone.input_size)
        except Exception as exc:
            raise HTTPException(400, f"cannot decode the image: {exc}") from exc
        pixels = pixels_from_uint8(array, backbone.input_size)[None].to(loaded.device)
        with torch.inference_mode():
            logits = model.reference(pixels, method)  # |G| backbone calls, one per group element
            scores, index = logits.float().softmax(-1).topk(min(top_k, len(labels)), dim=-1)
        predictions = [
            {"label": labels[i], "index": i, "score": s}
            for i, s in zip(index[0].tolist(), scores[0].tolist(), strict=True)
        ]
        seconds = time.perf_counter() - started
        return {
            "model": model_name,
            "method": method,
            "group": loaded.spec.group,
            "results": [{"predictions": predictions}],
            "timing": {"queue_ms": 0.0, "inference_ms": seconds * 1000, "batch_size": 1},
        }

    app = FastAPI(title="naive peer")

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    def check(name: str, method: str) -> None:
        if name != model_name:
            raise HTTPException(404, f"model {name!r} is not served")
        if method not in {m.value for m in loaded.spec.methods}:
            raise HTTPException(422, f"unknown method {method!r}")

    if mode == "sync":

        @app.post("/v1/models/{name}/classify")
        def classify_sync(
            name: str,
            image: Annotated[UploadFile, File()],
            method: Annotated[str, Form()] = "equitune",
            top_k: Annotated[int, Form()] = 5,
        ) -> dict[str, Any]:
            check(name, method)
            return classify_bytes(image.file.read(), method, top_k)

    else:

        @app.post("/v1/models/{name}/classify")
        async def classify_async(
            name: str,
            image: Annotated[UploadFile, File()],
            method: Annotated[str, Form()] = "equitune",
            top_k: Annotated[int, Form()] = 5,
        ) -> dict[str, Any]:
            check(name, method)
            return classify_bytes(await image.read(), method, top_k)

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="naive FastAPI peer: one request = |G| forwards in a loop")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="imagenet-effnet-c4")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    app = build_app(args.model, args.models_dir, args.mode, args.device, args.runtime)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The LitServe peer: the same model and the same fused pass, batched by LitServe instead.

LitServe (``pip install litserve``) runs an HTTP process (uvicorn) that parses the request
and puts it on a multiprocessing queue, and an inference worker process that collects a
batch (``max_batch_size``, ``batch_timeout``), calls ``decode_request`` per item,
``batch``, ``predict``, ``unbatch`` and ``encode_response``. Here ``decode_request`` runs
equiserve's own decoder and preprocessing, and ``predict`` runs equiserve's
``ClassifyModel`` (one fused ``B·|G|`` forward, then the per-method combination), so the only
difference to equiserve is the serving machinery around it.

Run (from the repository root)::

    python bench/peers/litserve_server.py --port 8002 [--max-batch-size 32] [--batch-timeout-ms 5]

Routes: ``POST /v1/models/{model}/classify`` (multipart ``image``, optional ``method`` and
``top_k``) and LitServe's ``GET /health`` (200 once the worker is ready).
"""

import argparse
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import litserve as ls  # noqa: E402
from fastapi import HTTPException  # noqa: E402

from app.backbones.images import decode_image  # noqa: E402
from app.config import DEFAULT_MODELS_DIR  # noqa: E402
from app.equivariance import Method  # noqa: E402
from app.tasks import load_model  # noqa: E402
from app.tasks.classify.messages import ImageResult  # noqa: E402
from app.tasks.classify.model import ImageItem  # noqa: E402

MAX_PIXELS = 25_000_000


class EquivariantLitAPI(ls.LitAPI):
    """equiserve's decoder, preprocessing and fused runner behind LitServe's batching loop."""

    def __init__(self, model: str, models_dir: Path, device: str, runtime: str = "torch", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name = model
        self.models_dir = models_dir
        self.target_device = device
        self.runtime = runtime

    def setup(self, device: str) -> None:
        self.loaded = load_model(self.models_dir, self.model_name, self.target_device, "float32", runtime=self.runtime)
        self.loaded.warmup(self.max_batch_size)

    def decode_request(self, request, **kwargs: Any) -> ImageItem:
        # No annotation on purpose: LitServe reads it to choose the body type, and only a
        # missing one (or starlette's Request) hands the parsed multipart form through.
        upload = request.get("image")
        if upload is None or not hasattr(upload, "file"):
            raise HTTPException(422, "send the image as the multipart field 'image'")
        upload.file.seek(0)
        array = decode_image(upload.file.read(), max_pixels=MAX_PIXELS, min_side=self.loaded.backbone.input_size)
        method = Method(request.get("method") or self.loaded.spec.default_method.value)
        top_k = int(request.get("top_k") or 5)
        return ImageItem(self.loaded.preprocess(array), method, top_k)

    def batch(self, inputs: list[ImageItem]) -> list[ImageItem]:
        return inputs

    def predict(self, items: list[ImageItem], **kwargs: Any) -> list[tuple[ImageResult | BaseException, int]]:
        return [(result, len(items)) for result in self.loaded(items)]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: tuple[ImageResult | BaseException, int], **kwargs: Any) -> dict[str, Any]:
        result, batch_size = output
        if isinstance(result, BaseException):
            raise HTTPException(500, f"inference failed: {type(result).__name__}")
        return {
            "model": self.model_name,
            "results": [
                {
                    "predictions": [{"label": p.label, "index": p.index, "score": p.score} for p in result.predictions],
                    "transforms": [
                        {"name": t.name, "lambda": t.weight, "top_label": t.top_label, "top_score": t.top_score}
                        for t in result.transforms
                    ],
                    "selected_transform": result.selected_transform,
                    "lambda_net_entropy": result.lambda_net_entropy,
                    "weight_entropy": result.weight_entropy,
                }
            ],
            "timing": {"batch_size": batch_size},
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LitServe peer with equiserve's model and fused runner")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--model", default="imagenet-effnet-c4")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="torch")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="LitServe's request timeout")
    args = parser.parse_args(argv)
    api = EquivariantLitAPI(
        args.model,
        args.models_dir,
        args.device,
        args.runtime,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout_ms / 1000,
        api_path=f"/v1/models/{args.model}/classify",
    )
    server = ls.LitServer(
        api,
        accelerator="cpu" if args.device == "cpu" else "cuda",
        devices=1,
        workers_per_device=1,
        timeout=args.timeout_s,
    )
    server.run(host=args.host, port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

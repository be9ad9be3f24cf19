"""Health, the model list and metrics. No torch here: the engine does the math."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.metrics import CONTENT_TYPE_LATEST

from .common import engine_of, require_api_key, settings_of
from .schemas import Health, ModelCard, ModelList


def build_router() -> APIRouter:
    router = APIRouter()

    # GET and HEAD: probes and load balancers send either.
    @router.api_route("/health/live", methods=["GET", "HEAD"], response_model=Health,
                      response_model_exclude_none=True, tags=["health"])  # fmt: skip
    @router.api_route("/v2/health/live", methods=["GET", "HEAD"], response_model=Health,
                      response_model_exclude_none=True, include_in_schema=False)  # fmt: skip
    async def live() -> Health:
        return Health(status="ok", live=True)

    @router.api_route("/health/ready", methods=["GET", "HEAD"], response_model=Health, tags=["health"],
                      responses={503: {"model": Health}})  # fmt: skip
    @router.api_route("/v2/health/ready", methods=["GET", "HEAD"], response_model=Health, include_in_schema=False)
    async def ready(request: Request) -> Response:
        engine = engine_of(request)
        # "ready" is the field the Open Inference Protocol's clients read; "status" says why.
        if engine.draining:
            return JSONResponse({"status": "draining", "ready": False}, status_code=503)
        if engine.load_error is not None:
            body = {"status": "failed", "ready": False, "error": str(engine.load_error)}
            return JSONResponse(body, status_code=503)
        if not engine.ready:
            remaining = engine.load_times.remaining_s(engine.pending)
            body = {
                "status": "loading", "ready": False, "loaded": engine.loaded, "pending": engine.pending,
                "loading": engine.load_times.current,
                "estimated_remaining_s": None if remaining is None else round(remaining, 1),
            }  # fmt: skip
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "ready": True})

    @router.get("/v1/models", response_model=ModelList, response_model_exclude_unset=True, tags=["models"])
    async def models(request: Request) -> ModelList:
        return ModelList(models=[ModelCard(**card) for card in engine_of(request).cards()])

    @router.get("/metrics", tags=["metrics"], response_class=Response)
    async def metrics(request: Request) -> Response:
        if settings_of(request).protect_metrics:
            await require_api_key(request)
        return Response(engine_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router

"""``create_app(settings)``: the FastAPI app whose lifespan loads the models once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.docs import build_docs_router
from app.api.errors import install_error_handlers
from app.api.inference import build_inference_router
from app.api.middleware import RequestContextMiddleware
from app.api.openapi import install_openapi
from app.api.routes import build_router
from app.api.v2 import build_v2_router
from app.api.web import build_web_router
from app.config import Settings
from app.engine.engine import Engine

log = logging.getLogger("equiserve.server")
# The engine is idle by the time the lifespan ends (DrainingServer), so a gRPC call still open is
# only writing its answer, or one that came after the drain timeout: as uvicorn's own grace.
GRPC_GRACE_S = 5.0

DESCRIPTION = """
Invariant and equivariant predictions from pretrained models with λ-equitune
(Basu et al., NeurIPS 2023): every request's input is transformed by each element of a
group (e.g. the four 90° rotations of a photo, or demographic word swaps of a prompt), all
copies of the whole batch go through the backbone in one fused pass, and the outputs are
mapped back and combined — uniformly (equitune), by the most confident copy (equizero) or
with learned weights λ (λ-equitune).
"""


def create_app(
    settings: Settings | None = None, engine: Engine | None = None, *, load_in_background: bool = False
) -> FastAPI:
    """The app. ``load_in_background``: the lifespan starts loading the models and returns at once,
    so the server listens (health answers, inference is 503) while they load; what ``serve`` does.
    Without it the lifespan returns once every model is loaded and warm (tests, Ray replicas)."""
    settings = settings or Settings()
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load_in_background:
            engine.start_in_background()
        else:
            await engine.start()
            log.info("ready: serving %s", ", ".join(engine.models))
        grpc = None
        if settings.grpc_port:  # imported only then: grpcio is the 'grpc' extra
            from app.api.grpc_service import start_grpc_server

            grpc = await start_grpc_server(engine, settings, app.version)
        try:
            yield
        finally:
            if grpc is not None:  # the drain is done (or timed out): answer what is left, refuse new calls
                await grpc.stop(GRPC_GRACE_S)
            await engine.stop()
            log.info("stopped: every accepted request was answered")

    # /docs and /redoc are served by build_docs_router with assets shipped in a package: offline.
    app = FastAPI(
        title="equiserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings = settings
    app.state.engine = engine
    for router in (
        build_router(),
        build_inference_router(),
        build_v2_router(),
        build_docs_router(),
        build_web_router(),
    ):
        app.include_router(router)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        metrics=engine.metrics,
        served_models=lambda: set(engine.models),
    )
    install_error_handlers(app)
    install_openapi(app, engine, settings)
    return app

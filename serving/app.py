"""The scoring service: `create_app(settings)` → FastAPI app (`longer serve` runs it with uvicorn).

Laid out as FastAPI's "bigger applications": the routes on an APIRouter (serving/routes.py),
the shared state in `Service` (serving/service.py) reached through a dependency, the user-state
cache policy — hit, incremental, full, bypass — in `UserStateCache` (serving/state_cache.py), the metrics in
serving/metrics.py. This module assembles them: middleware, error handlers, lifespan.

No client input gives a 5xx: bodies are bounded in size and read time (serving/limits.py),
request models are strict and built from the bundle's FeatureSpec (serving/schemas.py), a 422 always encodes (serving/errors.py), an
unloadable bundle is a 409. A 503 means the store: unreachable, or a user's key unusable
(named in the answer, counted in `longer_bad_keys_total`).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from feature_store.online import BadKeyError, OnlineStore

from .errors import validation_failed
from .hops import InFlight
from .limits import BodyLimits
from .metrics import Latency
from .routes import router
from .runtime import ModelRuntime
from .service import Service, watch_bundle
from .settings import Settings


def install_error_handling(app: FastAPI, svc: Service, settings: Settings) -> None:
    """Requests counted (outermost), body limits, latency, a 422 that always encodes, a 503
    naming a bad key."""
    metrics = svc.metrics
    app.add_middleware(Latency, histogram=metrics.latency)
    app.add_middleware(
        BodyLimits,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        on_reject=lambda reason: metrics.rejected.labels(reason).inc(),
    )
    app.add_middleware(InFlight, hops=svc.hops)  # outermost: counted from arrival (serving/hops.py)
    app.add_exception_handler(RequestValidationError, validation_failed)

    async def bad_key(request: Request, exc: BadKeyError) -> JSONResponse:
        metrics.bad_keys.labels(exc.kind).inc()
        return JSONResponse({"detail": str(exc)}, status_code=503)

    app.add_exception_handler(BadKeyError, bad_key)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client's mistake: uvicorn closes the connection after it, so say so.
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__})"},
            status_code=500,
            headers={"Connection": "close"},
        )

    app.add_exception_handler(Exception, server_error)


def spec_openapi(app: FastAPI) -> None:
    """/openapi.json shows the loaded bundle's request bodies (serving/schemas.py
    `request_models`: /v1/score's, /v1/events' and PUT /v1/users/{user_id}'s): regenerated whenever the model_version changes, so a hot reload to a
    bundle with another FeatureSpec changes the documented fields with the validated ones."""
    generate = app.openapi
    cached: dict = {}

    def openapi() -> dict:
        rt = app.state.service.runtime
        if cached.get("version") != rt.model_version:
            app.openapi_schema = None
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in rt.models.components.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[name] = body
            cached.update(version=rt.model_version, schema=schema)
        return cached["schema"]

    app.openapi = openapi


@asynccontextmanager
async def lifespan(app: FastAPI):
    svc: Service = app.state.service
    every = svc.settings.watch_s
    watcher = asyncio.create_task(watch_bundle(svc, every)) if every > 0 else None
    svc.settle_heap()
    yield
    if watcher:
        watcher.cancel()
    await svc.close()


def create_app(
    settings: Settings, runtime: ModelRuntime | None = None, store: OnlineStore | None = None
) -> FastAPI:
    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the installed fastapi-offline
    # package (under /static-offline-docs), never from a CDN; no online spec-validator badge either.
    app = FastAPIOffline(
        title="LONGER scoring service",
        version="1",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},
        description="Scores candidates for a user against the user's cached sequence state "
        "(LONGER, arXiv 2505.04421). See docs/architecture.md.",
    )
    app.state.service = Service(settings, runtime, store)
    install_error_handling(app, app.state.service, settings)
    app.include_router(router)
    spec_openapi(app)
    return app

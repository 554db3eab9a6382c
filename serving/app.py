"""The scoring service: `create_app(settings)` → FastAPI app (`longer serve` runs it with uvicorn).

/v1/score reads the user's sequence, version and cached UserState in one pipelined Redis round
trip. Hit: score the candidates against the cached state. Miss: encode the history (events
strictly before the request time), score, and write the state back after the response is
sent. Redis unreachable: answer from the history in the request, `user_state: "bypass"`.

No client input gives a 5xx: bodies are bounded in size and read time (serving/limits.py),
request models are strict (serving/schemas.py), a 422 always encodes (serving/errors.py), an
unloadable bundle is a 409. A 503 means the store: unreachable, or a user's key unusable
(named in the answer, counted in `longer_bad_keys_total`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from feature_store.online import EVENT_DTYPE, BadKeyError, OnlineStore, connect, sort_events, store_errors
from feature_store.online import Event as StoreEvent
from trainer.export import BundleError, declared_version

from .errors import invalid, responses, validation_failed
from .limits import BodyLimits
from .runtime import ModelRuntime, state_tag
from .schemas import (
    EventsRequest,
    EventsResponse,
    ModelInfo,
    Readiness,
    ReloadResult,
    ScoreRequest,
    ScoreResponse,
)
from .settings import Settings

log = logging.getLogger("longer.serving")

STORE_ERRORS = store_errors()


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "longer_request_seconds",
            "request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.user_state = Counter(
            "longer_user_state_total",
            "score requests by user-state outcome",
            ["result"],
            registry=self.registry,
        )
        self.candidates = Counter(
            "longer_candidates_scored_total", "candidates scored", registry=self.registry
        )
        self.events = Counter(
            "longer_events_appended_total",
            "events appended (new ones only: a repeated event_id is not counted)",
            registry=self.registry,
        )
        self.redis_errors = Counter("longer_redis_errors_total", "failed Redis calls", registry=self.registry)
        self.bad_keys = Counter(
            "longer_bad_keys_total",
            "requests answered 503 for an unusable user key, by key kind (seq, ver, ids)",
            ["kind"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "longer_requests_rejected_total",
            "requests refused before routing (too_large, timeout)",
            ["reason"],
            registry=self.registry,
        )
        self.model = Gauge("longer_model_info", "the loaded model", ["model_version"], registry=self.registry)


class Latency:
    """Pure ASGI: request latency per route into the histogram."""

    def __init__(self, app, histogram: Histogram):
        self.app, self.histogram = app, histogram

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            self.histogram.labels(getattr(route, "path", "other")).observe(time.perf_counter() - t0)


class Service:
    """Shared state of one app: model runtime, store, executor, metrics."""

    def __init__(
        self, settings: Settings, runtime: ModelRuntime | None = None, store: OnlineStore | None = None
    ):
        self.settings = settings
        self.reload_lock = asyncio.Lock()
        self.runtime = runtime or ModelRuntime(settings.model, settings.threads, settings.state_precision)
        self.store = store or OnlineStore(
            connect(settings.redis_url or None),
            max_len=settings.store_max_len or self.runtime.max_len,
            prefix=settings.key_prefix,
            state_ttl_s=settings.state_ttl_s,
        )
        self.pool = ThreadPoolExecutor(max_workers=self.runtime.threads, thread_name_prefix="longer-model")
        self.metrics = Metrics()
        self.metrics.model.labels(self.runtime.version).set(1)
        self.inflight: dict[tuple, asyncio.Future] = {}

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def reload(self) -> dict:
        """Load the bundle directory again and swap it in if its version changed. Requests in
        flight finish on the model they started with; cached states are keyed per version.
        BundleError (with the reason) when the directory holds no loadable bundle: the current
        model keeps serving."""
        async with self.reload_lock:
            current = self.runtime
            version = declared_version(self.settings.model)
            if version == current.version:
                return {"model_version": current.version, "reloaded": False}
            try:
                new = await self.run(
                    ModelRuntime, self.settings.model, self.settings.threads, self.settings.state_precision
                )
            except BundleError:
                raise
            except Exception as e:  # whatever a hostile or half-copied directory makes the loader raise
                raise BundleError(f"{self.settings.model}: {type(e).__name__}: {e}") from e
            self.runtime = new
            self.metrics.model.clear()
            self.metrics.model.labels(new.version).set(1)
            return {"model_version": new.version, "previous": current.version, "reloaded": True}

    async def redis(self, fn, *args):
        try:
            return await self.run(fn, *args)
        except STORE_ERRORS:
            self.metrics.redis_errors.inc()
            raise

    async def encode_once(self, rt: ModelRuntime, key: tuple, user_id: int, events: np.ndarray):
        """Concurrent misses for the same (model, user, sequence) compute the state once."""
        fut = self.inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            state = await self.run(rt.encode, user_id, events)
            fut.set_result(state)
            return state
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            del self.inflight[key]


async def watch_bundle(svc: Service, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await svc.reload()
        except Exception as e:  # noqa: BLE001 -- a half-copied or bad bundle: keep serving, retry later
            log.warning("bundle watcher: reload failed, still serving the current model: %s", e)


def service(request: Request) -> Service:
    return request.app.state.service


def bearer_matches(header: str, token: str) -> bool:
    """`Authorization: Bearer <token>`, the scheme case-insensitive (RFC 7235), the token
    compared in constant time."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape")
    )


def require_token(request: Request, svc: Service = Depends(service)) -> None:
    token = svc.settings.token
    if token and not bearer_matches(request.headers.get("authorization", ""), token):
        raise HTTPException(
            401,
            "missing or wrong bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def install_error_handling(app: FastAPI, svc: Service, settings: Settings) -> None:
    """Body limits (outermost), latency, a 422 that always encodes, a 503 naming a bad key."""
    metrics = svc.metrics
    app.add_middleware(Latency, histogram=metrics.latency)
    app.add_middleware(
        BodyLimits,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        on_reject=lambda reason: metrics.rejected.labels(reason).inc(),
    )
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


def create_app(
    settings: Settings, runtime: ModelRuntime | None = None, store: OnlineStore | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = app.state.service
        watcher = asyncio.create_task(watch_bundle(svc, settings.watch_s)) if settings.watch_s > 0 else None
        yield
        if watcher:
            watcher.cancel()
        svc.pool.shutdown(wait=False)

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the installed fastapi-offline
    # package (under /static-offline-docs), never from a CDN; no online spec-validator badge either.
    app = FastAPIOffline(
        title="LONGER scoring service",
        version="1",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},
        description="Scores candidates for a user against the user's cached sequence state "
        '(LONGER, arXiv 2505.04421). See DESIGN.md "HTTP API".',
    )
    app.state.service = Service(settings, runtime, store)
    install_error_handling(app, app.state.service, settings)

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        summary="score candidates for a user",
        responses=responses(400, 408, 413, 503),
    )
    async def score(req: ScoreRequest, background: BackgroundTasks, svc: Service = Depends(service)):
        if len(req.candidates) > svc.settings.max_candidates:
            raise invalid(
                "candidates",
                f"at most {svc.settings.max_candidates} candidates per request "
                f"(LONGER_MAX_CANDIDATES), got {len(req.candidates)}",
                "too_long",
            )
        ts = req.ts if req.ts is not None else int(time.time())
        items = [c.item_id for c in req.candidates]
        cats = [c.category_id for c in req.candidates]
        rt = svc.runtime
        try:
            events, version, blob = await svc.redis(svc.store.read, req.user_id, rt.version)
        except STORE_ERRORS:
            hist = sort_events(
                np.array(
                    [(e.ts, e.item_id, e.category_id, e.action, e.label) for e in (req.history or [])],
                    EVENT_DTYPE,
                )
            )
            state = await svc.run(rt.encode, req.user_id, hist[hist["ts"] < ts])
            return await respond(svc, rt, state, items, cats, ts, "bypass")
        used = events[events["ts"] < ts]  # point in time: strictly earlier events only
        tag = state_tag(req.user_id, version, len(used))
        state = rt.loads(blob, tag)
        if state is not None:
            try:
                return await respond(svc, rt, state, items, cats, ts, "hit")
            except Exception as e:  # noqa: BLE001 -- a well-formed but unusable cached value: recompute it
                log.warning("user %s: cached state unusable (%s), recomputing", req.user_id, e)
                state = None
        state = await svc.encode_once(rt, (rt.version, req.user_id, version, len(used)), req.user_id, used)
        if len(used) == len(events):  # the state of the whole current sequence: cache it
            background.add_task(write_state, svc, rt, req.user_id, state, tag)
        return await respond(svc, rt, state, items, cats, ts, "miss")

    @app.post(
        "/v1/events",
        response_model=EventsResponse,
        dependencies=[Depends(require_token)],
        summary="append user events (idempotent per event_id)",
        responses=responses(400, 401, 408, 413, 503),
    )
    async def events(req: EventsRequest, svc: Service = Depends(service)):
        if len(req.events) > svc.settings.max_events:
            raise invalid(
                "events",
                f"at most {svc.settings.max_events} events per call (LONGER_MAX_EVENTS), "
                f"got {len(req.events)}",
                "too_long",
            )
        evs = [StoreEvent(**e.model_dump()) for e in req.events]
        try:
            done = await svc.redis(svc.store.append, evs)
        except STORE_ERRORS as e:
            raise HTTPException(503, f"online store unavailable: {e}") from e
        svc.metrics.events.inc(done.total)
        return EventsResponse(appended=done.total, versions={str(u): v for u, v in done.versions.items()})

    @app.post(
        "/v1/admin/reload",
        response_model=ReloadResult,
        dependencies=[Depends(require_token)],
        summary="reload the bundle directory; swaps the model atomically if its version changed",
        responses=responses(401, 408, 409, 413),
    )
    async def reload(svc: Service = Depends(service)):
        try:
            return await svc.reload()
        except BundleError as e:
            raise HTTPException(409, f"bundle not loadable, still serving the old model: {e}") from e

    @app.get("/healthz", summary="the process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        summary="model loaded and online store reachable",
        responses={503: {"model": Readiness, "description": "the online store is unreachable"}},
    )
    async def readyz(svc: Service = Depends(service)):
        try:
            await svc.redis(svc.store.ping)
        except STORE_ERRORS as e:
            return JSONResponse(
                {"status": "degraded", "model_version": svc.runtime.version, "redis": f"unreachable: {e}"},
                status_code=503,
            )
        return {"status": "ready", "model_version": svc.runtime.version, "redis": "ok"}

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text exposition format)",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics(svc: Service = Depends(service)):
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", response_model=ModelInfo, summary="the loaded model bundle")
    async def model(svc: Service = Depends(service)):
        b = svc.runtime.bundle
        return ModelInfo(model_version=b.version, config=b.config.to_dict(), feature_schema=b.schema)

    return app


async def respond(svc: Service, rt: ModelRuntime, state, items, cats, ts, outcome: str) -> ScoreResponse:
    scores = await svc.run(rt.score, state, items, cats, ts)
    svc.metrics.user_state.labels(outcome).inc()
    svc.metrics.candidates.inc(len(items))
    return ScoreResponse(model_version=rt.version, scores=scores, user_state=outcome)


async def write_state(svc: Service, rt: ModelRuntime, user_id: int, state, tag: dict) -> None:
    try:
        await svc.redis(svc.store.write_state, user_id, rt.version, rt.dumps(state, tag))
    except STORE_ERRORS as e:  # the next request recomputes it; counted in longer_redis_errors_total
        log.debug("user %s: state write-back failed: %s", user_id, e)

"""The HTTP routes of the scoring service, on one `APIRouter`; thin handlers over `Service`
(serving/service.py), which reaches them through the `service` dependency.

/v1/score leaves the user-state policy (hit, incremental, full, bypass) to `UserStateCache`
(serving/state_cache.py) and the item-table fill-ins to `FeatureTables` (serving/features.py),
which also upserts profiles (PUT /v1/users/{user_id}); /v1/events hands the users it appended
to to the near-line `Refresher` (serving/refresh.py). The bodies of /v1/score, /v1/events and
PUT /v1/users/{user_id} are the loaded bundle's (serving/schemas.py `request_models`).
/v1/events, PUT /v1/users/{user_id} and /v1/admin/reload need the bearer token when one is set.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from typing import Annotated

import orjson
from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from feature_store.online import LayoutError, store_errors
from trainer.export import BundleError

from .errors import invalid, responses
from .features import ListTooLong
from .runtime import CandidateColumns, as_columns
from .schemas import (
    INT64_MAX,
    EventsResponse,
    ModelInfo,
    ProfileResult,
    Readiness,
    ReloadResult,
    ScoreResponse,
)
from .service import Service

STORE_ERRORS = store_errors()

router = APIRouter()


async def service(request: Request) -> Service:
    """async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request."""
    return request.app.state.service


def bearer_matches(header: str, token: str) -> bool:
    """`Authorization: Bearer <token>`, the scheme case-insensitive (RFC 7235), the token
    compared in constant time."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape")
    )


async def require_token(request: Request, svc: Service = Depends(service)) -> None:
    token = svc.settings.token
    if token and not bearer_matches(request.headers.get("authorization", ""), token):
        raise HTTPException(
            401,
            "missing or wrong bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def at_most(what: str, items: list, limit: int, variable: str, unit: str) -> None:
    if len(items) > limit:
        raise invalid(what, f"at most {limit} {what} {unit} ({variable}), got {len(items)}", "too_long")


async def spec_body(request: Request, model):
    """The JSON body validated against a model built at run time (the bundle's), answered as
    FastAPI answers a declared body: JSON errors and pydantic errors are 422 under loc "body",
    an unparseable body (invalid UTF-8, nested too deep) is 400."""
    try:
        data = json.loads(await request.body())
    except json.JSONDecodeError as e:
        error = {"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error", "input": {}}
        raise RequestValidationError([{**error, "ctx": {"error": e.msg}}], body=e.doc) from None
    except Exception as e:
        raise HTTPException(400, "There was an error parsing the body") from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors, body=data) from None


async def score_body(request: Request, model):
    """`spec_body` in one pass when the body is valid: pydantic parses and validates the raw
    bytes together (no intermediate dicts); any failure goes through `spec_body`, which answers
    it exactly as before."""
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError:
        return await spec_body(request, model)


def candidate_columns(req, rt) -> CandidateColumns:
    """The request's candidates as columns: the columnar form's arrays as they are
    (`category_ids` when the spec declares category_id; every other column left out), the
    object form's read off its objects once."""
    if req.candidates is not None:
        return as_columns(req.candidates, rt.spec)
    with_cat = req.category_ids is not None and "category_id" in rt.spec.candidate
    return CandidateColumns(req.item_ids, {"category_id": req.category_ids} if with_cat else {})


async def store_call(call):
    """Await a store call; the store unreachable, or of a layout not known (LayoutError: a
    spec store whose list widths it could not read, feature_store/online.py), is a 503 saying so."""
    try:
        return await call
    except (*STORE_ERRORS, LayoutError) as e:
        raise HTTPException(503, f"online store unavailable: {e}") from e


def spec_body_doc(component: str) -> dict:
    """openapi_extra of a route whose body is one of the loaded bundle's request models
    (serving/schemas.py `request_models`; serving/app.py `spec_openapi` fills the component)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}},
        },
        "responses": {  # FastAPI adds this only for a body it validates itself
            "422": {
                "description": "Validation Error",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
                },
            }
        },
    }


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    summary="score candidates for a user",
    responses=responses(400, 408, 413, 503),
    # the body is the loaded bundle's ScoreRequest (serving/schemas.py `request_models`); the
    # OpenAPI schema shows it (serving/app.py `spec_openapi`)
    openapi_extra=spec_body_doc("ScoreRequest"),
)
async def score(request: Request, background: BackgroundTasks, svc: Service = Depends(service)):
    """The candidates' tensors are built in the thread that scores them (the cache's hop to the
    pool, serving/state_cache.py, or the event loop's own for a request alone in the server,
    serving/hops.py), once; the response is serialised once, here."""
    rt = svc.runtime  # one model for the whole request, even across a reload
    req = await score_body(request, rt.models.score)
    given = candidate_columns(req, rt)
    at_most(req.candidate_field, given, svc.settings.max_candidates, "LONGER_MAX_CANDIDATES", "per request")
    ts = req.ts if req.ts is not None else int(time.time())
    context = req.context.model_dump() if req.context is not None else {}
    known, from_items = await svc.features.fill_from_items(rt, given)
    built = []  # (Candidates, fill-ins), built on first use

    def score_state(state):
        if not built:
            built.append(rt.candidates(given, context, ts, known))
        return rt.score(state, built[0][0])

    scores, outcome = await svc.cache.score(
        rt, req.user_id, ts, req.history or [], score_state, background.add_task
    )
    for (column, source), n in (from_items | built[0][1]).items():
        svc.metrics.fill_ins.labels(column, source).inc(n)
    svc.metrics.user_state.labels(outcome).inc()
    svc.metrics.candidates.inc(len(given))
    if not all(map(math.isfinite, scores)):  # orjson would write null: a model bug, answered 500
        raise ValueError(f"user {req.user_id}: the model returned a non-finite score")
    body = {"model_version": rt.model_version, "scores": scores, "user_state": outcome}
    return Response(orjson.dumps(body), media_type="application/json")  # 0.01 ms for 500 scores; json: 0.17


@router.post(
    "/v1/events",
    response_model=EventsResponse,
    dependencies=[Depends(require_token)],
    summary="append user events (idempotent per event_id), with the bundle's sequence columns",
    responses=responses(400, 401, 408, 413, 503),
    openapi_extra=spec_body_doc("EventsRequest"),
)
async def events(request: Request, svc: Service = Depends(service)):
    rt = svc.runtime
    req = await spec_body(request, rt.models.events)
    at_most("events", req.events, svc.settings.max_events, "LONGER_MAX_EVENTS", "per call")
    try:
        done = await store_call(svc.redis(svc.features.append, rt, req.events))
    except ListTooLong as e:
        raise invalid(("events", e.index, e.column), str(e), "too_long") from None
    svc.metrics.events.inc(done.total)
    svc.cache.moved(done.seq_versions)  # their held states are stale now: no early score
    svc.refresher.schedule(u for u, n in done.added.items() if n)  # off the request path
    return EventsResponse(appended=done.total, versions={str(u): v for u, v in done.seq_versions.items()})


@router.put(
    "/v1/users/{user_id}",
    response_model=ProfileResult,
    dependencies=[Depends(require_token)],
    summary="upsert the user's profile (the bundle's user columns); invalidates the user's cached states",
    responses=responses(400, 401, 408, 413, 503),
    openapi_extra=spec_body_doc("UserProfile"),
)
async def put_user(
    user_id: Annotated[int, Path(ge=0, le=INT64_MAX)], request: Request, svc: Service = Depends(service)
):
    rt = svc.runtime
    profile = await spec_body(request, rt.models.profile)
    version, written = await store_call(svc.features.put_profile(rt, user_id, profile))
    svc.cache.moved({user_id: version})
    return ProfileResult(user_id=user_id, seq_version=version, updated=written)


@router.post(
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


@router.get("/healthz", summary="the process is alive")
async def healthz():
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="model loaded and online store reachable",
    responses={503: {"model": Readiness, "description": "the online store is unreachable"}},
)
async def readyz(svc: Service = Depends(service)):
    try:
        await svc.redis(svc.store.ping)
        await svc.redis(svc.store.check_layout)  # and re-read which profile and item columns it holds
    except (*STORE_ERRORS, LayoutError) as e:
        what = f"unreachable: {e}" if not isinstance(e, LayoutError) else str(e)
        return JSONResponse(
            {"status": "degraded", "model_version": svc.runtime.model_version, "redis": what},
            status_code=503,
        )
    return {"status": "ready", "model_version": svc.runtime.model_version, "redis": "ok"}


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(svc: Service = Depends(service)):
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/model", response_model=ModelInfo, summary="the loaded model bundle")
async def model(svc: Service = Depends(service)):
    rt = svc.runtime
    b = rt.bundle
    return ModelInfo(model_version=rt.model_version, config=b.config.to_dict(), feature_schema=b.schema)

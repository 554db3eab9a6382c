"""Replay drivers: send reconstructed requests to arms in timestamp order, post each request's
events to the arm right after it (so cached states are invalidated as in production), never
reorder one user's requests, bound concurrency, pace to a QPS, retry transport errors and 5xx
with backoff — and record every outcome, failures included."""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from .traffic import Request


@dataclass
class Arm:
    name: str
    client: httpx.AsyncClient  # base_url = the arm's server, or an in-process ASGI transport
    on_close: list = field(default_factory=list)  # callables run when the replay is over
    spec: dict | None = None  # the arm's bundle's feature spec (GET /v1/model), read by `replay`

    async def close(self) -> None:
        await self.client.aclose()
        for fn in self.on_close:  # in order; a coroutine function is awaited
            if inspect.isawaitable(done := fn()):
                await done


@dataclass
class Outcome:
    arm: str
    index: int  # the request's position in the replay
    user_id: int
    ts: int
    labels: tuple[int, ...]
    scores: list[float] | None = None
    user_state: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    retries: int = 0
    event_errors: int = field(default=0)


async def _call(
    client: httpx.AsyncClient, path: str, body: dict, retries: int, backoff_s: float, timeout_s: float
):
    """POST with retries on transport errors, timeouts and 5xx; returns (response or None, error,
    retries used). The timeout is enforced here, so it holds for in-process arms too."""
    error = None
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            r = await asyncio.wait_for(client.post(path, json=body), timeout_s)
        except (httpx.TransportError, asyncio.TimeoutError) as e:
            error = f"{type(e).__name__}: {e}" if str(e) else f"Timeout after {timeout_s:g} s"
            continue
        if r.status_code >= 500:
            error = f"HTTP {r.status_code}: {r.text[:200]}"
            continue
        if r.status_code >= 400:
            return None, f"HTTP {r.status_code}: {r.text[:200]}", attempt
        return r, None, attempt
    return None, error, retries


async def arm_spec(arm: Arm) -> dict | None:
    """The arm's declared features (its bundle's feature_schema.json "spec"); None: the default."""
    try:
        r = await arm.client.get("/v1/model")
        return r.json().get("feature_schema", {}).get("spec") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None  # the replay's calls will count the arm's errors


def score_body(req: Request, spec: dict | None) -> dict:
    """The /v1/score body of a logged request for an arm: item_id, and of the logged columns
    those the arm's spec declares (candidate and dense per candidate, context per request; the
    user columns come from the arm's store)."""
    spec = spec or {"candidate": ["category_id"], "dense": [], "context": []}
    cols = {"category_id": req.category_id, **req.columns}
    per_cand = [c for c in (*spec.get("candidate", ()), *spec.get("dense", ())) if c in cols]
    body = {
        "user_id": req.user_id,
        "ts": req.ts,
        "candidates": [
            {"item_id": it, **{c: cols[c][k] for c in per_cand}} for k, it in enumerate(req.item_id)
        ],
    }
    context = {c: cols[c][0] for c in spec.get("context", ()) if c in cols}
    return {**body, "context": context} if context else body


def events_body(req: Request, spec: dict | None) -> dict:
    """The /v1/events body of a logged request's events for an arm: the stored fields, and of
    the logged columns those the arm's spec declares as sequence columns (a list column: its
    list of ids)."""
    spec = spec or {}
    seq = [c for c in spec.get("sequence", ()) if c in req.columns]
    return {
        "events": [
            {
                "user_id": req.user_id,
                "item_id": it,
                "category_id": c,
                "action": a,
                "label": y,
                "ts": t,
                "event_id": f"replay-{req.user_id}-{t}-{it}-{k}",
                **{s: req.columns[s][k] for s in seq},
            }
            for k, (it, c, a, y, t) in enumerate(
                zip(req.item_id, req.category_id, req.action, req.label, req.event_ts)
            )
        ]
    }


async def replay(
    requests: list[Request],
    arms: list[Arm],
    route,
    concurrency: int = 8,
    qps: float = 0.0,
    retries: int = 2,
    backoff_s: float = 0.05,
    timeout_s: float = 30.0,
    progress: bool = True,
) -> list[Outcome]:
    """`route(request) -> list of arm names` decides which arms get each request."""
    by_name = {a.name: a for a in arms}
    sem = asyncio.Semaphore(concurrency)
    last: dict[tuple[str, int], asyncio.Task] = {}
    outcomes: list[Outcome] = []
    bar = tqdm(total=sum(len(route(r)) for r in requests), unit="req", desc="replay", disable=not progress)

    async def one(i: int, req: Request, arm: Arm, previous: asyncio.Task | None) -> None:
        if previous is not None:
            await previous  # one user's requests reach an arm in order, each after the last one's events
        out = Outcome(arm.name, i, req.user_id, req.ts, req.label)
        body = score_body(req, arm.spec)
        async with sem:
            t0 = time.perf_counter()
            r, out.error, out.retries = await _call(
                arm.client, "/v1/score", body, retries, backoff_s, timeout_s
            )
            out.latency_ms = (time.perf_counter() - t0) * 1e3
            if r is not None:
                data = r.json()
                out.scores, out.user_state = data["scores"], data["user_state"]
            events = events_body(req, arm.spec)
            r2, _err, _ = await _call(arm.client, "/v1/events", events, retries, backoff_s, timeout_s)
            out.event_errors = int(r2 is None)
        outcomes.append(out)
        bar.update(1)

    for arm in arms:
        arm.spec = await arm_spec(arm)
    t_start = time.perf_counter()
    tasks = []
    for i, req in enumerate(requests):
        if qps > 0:
            wait = t_start + i / qps - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        for name in route(req):
            key = (name, req.user_id)
            task = asyncio.create_task(one(i, req, by_name[name], last.get(key)))
            last[key] = task
            tasks.append(task)
    await asyncio.gather(*tasks)
    bar.close()
    outcomes.sort(key=lambda o: (o.arm, o.index))
    return outcomes

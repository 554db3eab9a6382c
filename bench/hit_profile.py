"""Where one /v1/score hit spends its time: the app driven in-process through ASGI (no socket,
no HTTP client), profiled with pyinstrument, its samples sorted into the stages of a hit.

pyinstrument samples only the thread it starts in, so the profiled app runs its executor work
inline (`InlineExecutor`) on the event loop's thread; what the real thread-pool hops cost is
measured apart, as the difference of the in-process p50 with the pool and inline
(`asgi_latencies`). A sample belongs to the innermost stage on its stack:

    parse_validate  reading the body, JSON → dict, request-model validation (FastAPI + pydantic)
    redis_read      OnlineStore.read / read_head: the pipelined round trip (and the events' unpacking)
    decode          codec.decode: the cached state's bytes → tensors
    compute         ModelRuntime.score: candidates → scores (what `score` costs in-process)
    serialise       the response's JSON (FastAPI's serialize_response)
    handler         the route's and UserStateCache's own code around those (candidate lists,
                    tag checks, the point-in-time cut, building ScoreResponse)
    framework       the rest: Starlette/FastAPI routing, middleware, asyncio
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor, Future
from pathlib import Path

from bench import write_atomic

# (stage, function name, a piece of its file's path): the first rule a frame matches names it.
RULES = (
    ("compute", "score", "serving/runtime.py"),
    ("decode", "decode", "feature_store/codec.py"),
    ("redis_read", "read", "feature_store/online.py"),
    ("redis_read", "read_head", "feature_store/online.py"),
    ("parse_validate", "solve_dependencies", "fastapi/dependencies/utils.py"),
    ("parse_validate", "json", "starlette/requests.py"),
    ("parse_validate", "body", "starlette/requests.py"),
    ("serialise", "serialize_response", "fastapi/routing.py"),
    ("handler", "score", "serving/routes.py"),
    ("handler", "score", "serving/state_cache.py"),
    ("handler", "read_hit", "serving/state_cache.py"),
)
STAGES = ("parse_validate", "redis_read", "decode", "compute", "serialise", "handler", "framework")


class InlineExecutor(Executor):
    """Runs each submitted call at once, in the caller's thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 -- handed to the caller, whose await re-raises it
            fut.set_exception(e)
        return fut


async def asgi_post(app, path: str, body: bytes) -> tuple[int, bytes]:
    """One POST through the ASGI app: (status, body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent, out = False, {"status": 0, "body": b""}

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # a disconnect is never awaited on this path
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return out["status"], out["body"]


def asgi_latencies(app, body: bytes, n: int) -> list[float]:
    """ms of `n` sequential hits through the ASGI app (after one warm-up)."""

    async def run():
        await asgi_post(app, "/v1/score", body)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            status, text = await asgi_post(app, "/v1/score", body)
            times.append((time.perf_counter() - t0) * 1e3)
            if status != 200 or b'"hit"' not in text:
                raise RuntimeError(f"profiled request was not a hit: {status} {text[:200]!r}")
        return times

    return asyncio.run(run())


def stage_of(frame, inherited: str) -> str:
    for stage, function, where in RULES:
        if frame.function == function and where in (frame.file_path or "").replace("\\", "/"):
            return stage
    return inherited


def breakdown(root, hits: int) -> dict:
    """ms per hit in each stage, from a pyinstrument frame tree."""
    totals = dict.fromkeys(STAGES, 0.0)

    def walk(frame, stage: str) -> None:
        stage = stage_of(frame, stage)
        totals[stage] += frame.total_self_time
        for child in frame.children:
            walk(child, stage)

    if root is not None:
        walk(root, "framework")
    return {s: round(1e3 * t / hits, 3) for s, t in totals.items()}


def profile_hits(app, body: bytes, hits: int, save_to: Path) -> dict:
    """Profile `hits` hits in-process (executor inline); the stage breakdown per hit, and the
    profile as text and HTML at `save_to` (+ .txt, .html)."""
    from pyinstrument import Profiler

    svc = app.state.service
    pool, svc.pool = svc.pool, InlineExecutor()
    try:
        asgi_latencies(app, body, 2)  # warm
        profiler = Profiler(interval=0.0002, async_mode="disabled")
        profiler.start()
        asgi_latencies(app, body, hits)
        session = profiler.stop()
    finally:
        svc.pool = pool
    files = {ext: save_to.with_name(f"{save_to.name}.{ext}") for ext in ("txt", "html")}
    write_atomic(files["txt"], profiler.output_text(unicode=True, show_all=False))
    write_atomic(files["html"], profiler.output_html())
    stages = breakdown(session.root_frame(), hits + 1)
    return {
        "ms_per_hit": stages,
        "profiled_hits": hits + 1,
        "sampled_ms_per_hit": round(sum(stages.values()), 3),
        # the share of the profiled wall time this process was on a CPU: well below 1 on a
        # loaded machine, where waiting for a core inflates every stage
        "cpu_share": round(session.cpu_time / session.duration, 2) if session.duration else None,
        "files": [f.name for f in files.values()],
    }

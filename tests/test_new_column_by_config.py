"""A new column by config only (issue 15): a synthetic log gains a sequence column (`slot`), a
user column (`segment`) and a candidate column (`shop`), declared only in the run config's
`[features]` beside the synth's list candidate column, context and dense columns. build →
train → eval → `longer store load` → serve → score → replay run with no code edited, and the
online scores equal the offline predictions within 1e-5 with the candidate columns left out
of the request (filled from the store's item table) and the profile read from the store.
PUT /v1/users/{user_id} changes the profile and no cached state of the old one is served;
/v1/events stores the new sequence column; a store of another layout is refused."""

import contextlib
import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from feature_store.online import LayoutError, OnlineStore, connect, event_dtype
from feature_store.synth import SynthConfig, synthesize
from serving.app import create_app
from serving.settings import Settings
from tests.conftest import fresh_prefix
from tests.serving_utils import delete_prefix, shared_redis, tiny_bundle
from tests.test_trainer import run, run_toml

pytestmark = pytest.mark.slow

REDIS = "redis://127.0.0.1:6379/15"
FEATURES = """
[features]
sequence = ["category_id", "action", "slot"]
candidate = ["category_id", "shop", "tags"]
user = ["segment"]
context = ["device"]
dense = ["price"]
"""


def cli(args) -> dict:
    """`longer ARGS` in this process (no torch import to pay again); its JSON answer."""
    from longer_cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(a) for a in args]) == 0
    return json.loads(out.getvalue())


def add_columns(log) -> None:
    """The new columns, written into the log's parquet files: slot per event, segment per user,
    shop per item."""
    rng = np.random.default_rng(7)
    for f in sorted(log.glob("*.parquet")):
        t = pq.read_table(f)
        users, items = t.column("user_id").to_numpy(), t.column("item_id").to_numpy()
        t = t.append_column("slot", pa.array(rng.integers(1, 6, len(t)), pa.int64()))
        t = t.append_column("segment", pa.array(users % 4 + 1, pa.int64()))
        t = t.append_column("shop", pa.array(items % 7 + 1, pa.int64()))
        pq.write_table(t, f)


@contextlib.contextmanager
def trained_world(root, features: str, seed: int, edit_log=None):
    """synth (60 users, extra columns) → `edit_log(log)` → build → train → eval → `longer store
    load` (max_len 1000) under a fresh prefix of the shared Redis: the paths, the prefix and what
    the load answered; the prefix's keys are deleted afterwards."""
    shared_redis()  # skips without Redis
    synthesize(
        SynthConfig(users=60, items=200, events_per_user=40, seed=seed, extra_columns=True),
        root / "log",
        progress=False,
    )
    if edit_log is not None:
        edit_log(root / "log")
    cfg = root / "run.toml"
    cfg.write_text(run_toml(max_len=32, train_extra="warmup_steps = 2\nprefetch = 0") + features)
    data, bundle, preds = root / "data", root / "run" / "export", root / "preds.parquet"
    cli(["build", "--log", root / "log", "--out", data, "--max-len", 32, "--test-days", 5, "--config", cfg])
    run(["train", "--config", cfg, "--data", data, "--out", root / "run", "--quiet", "train.steps=6"])
    run(["eval", "--bundle", bundle, "--data", data, "--quiet", "--predictions", preds])
    prefix = fresh_prefix()
    try:
        load = ["store", "load", "--data", data, "--redis", REDIS, "--key-prefix", prefix, "--max-len", 1000]
        loaded = cli([*load, "--quiet"])
        yield {
            "root": root,
            "data": data,
            "bundle": bundle,
            "preds": preds,
            "prefix": prefix,
            "loaded": loaded,
        }
    finally:
        delete_prefix(connect(REDIS), prefix)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with trained_world(tmp_path_factory.mktemp("new_column"), FEATURES, seed=3, edit_log=add_columns) as w:
        yield w


def app_for(world, bundle=None, **settings):
    settings = Settings(
        model=str(bundle or world["bundle"]),
        redis_url=REDIS,
        key_prefix=world["prefix"],
        token="t",
        **settings,
    )
    return create_app(settings)


def replay_arms(world) -> dict:
    """Replay the log's eval days (30 requests) against two in-process arms of the world's bundle:
    each arm's report."""
    from serving.replay.run import run_replay

    split = json.loads((world["data"] / "meta.json").read_text())["split"]["split_ts"]
    bundle = str(world["bundle"])
    res = run_replay(
        str(world["root"] / "log"),
        str(world["root"] / "replay"),
        bundles=[f"a={bundle}", f"b={bundle}"],
        all_arms=True,
        start=split,
        limit=30,
        progress=False,
        n_boot=20,
    )
    return res["arms"]


def test_store_load_writes_the_new_columns(world):
    out = world["loaded"]
    assert out["profiles"] == 60 and out["items"] > 0
    store = OnlineStore(connect(REDIS), max_len=1000, prefix=world["prefix"], layout=event_dtype())
    with pytest.raises(LayoutError, match="slot"):
        store.check_layout()  # the default layout is not this store's


def test_online_scores_equal_offline_with_every_feature_kind(world):
    ev = pq.read_table(world["data"] / "eval").to_pydict()
    pred = pq.read_table(world["preds"]).to_pydict()
    users = pq.read_table(world["data"] / "users").to_pydict()
    assert dict(zip(users["user_id"], users["segment"])) == {u: u % 4 + 1 for u in users["user_id"]}
    rows = np.random.default_rng(0).choice(len(ev["user_id"]), 20, replace=False)
    with TestClient(app_for(world)) as client:
        for i in rows:
            cand = {"item_id": ev["item_id"][i], "category_id": ev["category_id"][i], "price": ev["price"][i]}
            body = {"user_id": ev["user_id"][i], "ts": ev["ts"][i], "candidates": [cand]}
            r = client.post("/v1/score", json={**body, "context": {"device": ev["device"][i]}})
            assert r.status_code == 200, r.text
            assert pred["row_id"][i] == i
            assert abs(r.json()["scores"][0] - pred["prediction"][i]) < 1e-5, (
                i,
                r.json(),
                pred["prediction"][i],
            )
        metrics = client.get("/metrics").text
        for col in ("shop", "tags"):  # left out, filled from the item table
            assert f'longer_feature_fill_ins_total{{column="{col}",source="item"}} 20.0' in metrics
        props = client.get("/openapi.json").json()["components"]["schemas"]
        assert set(props["UserProfile"]["properties"]) == {"segment"}
        assert "slot" in props["Event"]["properties"]


def test_put_profile_invalidates_the_cached_state(world):
    ev = pq.read_table(world["data"] / "eval").to_pydict()
    i = int(np.argmax(ev["ts"]))
    user = ev["user_id"][i]
    auth = {"Authorization": "Bearer t"}
    body = {"user_id": user, "ts": ev["ts"][i] + 1, "candidates": [{"item_id": ev["item_id"][i]}]}
    with TestClient(app_for(world)) as client:
        first = client.post("/v1/score", json=body).json()
        assert client.post("/v1/score", json=body).json()["user_state"] == "hit"
        segment = user % 4 + 1
        r = client.put(f"/v1/users/{user}", json={"segment": segment % 4 + 1}, headers=auth)
        assert r.status_code == 200 and r.json()["updated"] == ["segment"], r.text
        changed = client.post("/v1/score", json=body).json()
        assert changed["user_state"] == "full" and changed["scores"] != first["scores"]
        client.put(f"/v1/users/{user}", json={"segment": segment}, headers=auth)
        back = client.post("/v1/score", json=body).json()
        assert back["user_state"] == "full" and abs(back["scores"][0] - first["scores"][0]) < 1e-6
        r = client.put(f"/v1/users/{user}", json={"segment": 1, "color": 2}, headers=auth)
        assert r.status_code == 422 and "color" in r.text
        assert client.put(f"/v1/users/{user}", json={"segment": 1}).status_code == 401


def test_events_store_the_new_sequence_column(world):
    with TestClient(app_for(world)) as client:
        event = {"user_id": 999_001, "item_id": 5, "ts": 1_800_000_000, "slot": 4, "event_id": "e1"}
        r = client.post("/v1/events", json={"events": [event]}, headers={"Authorization": "Bearer t"})
        assert r.status_code == 200 and r.json()["appended"] == 1, r.text
        events, _, _ = client.app.state.service.store.read(999_001)
        assert events["slot"].tolist() == [4] and events["item_id"].tolist() == [5]
        r = client.post(
            "/v1/events", json={"events": [{**event, "color": 1}]}, headers={"Authorization": "Bearer t"}
        )
        assert r.status_code == 422 and "color" in r.text


def test_a_bundle_of_another_layout_is_refused(world, tmp_path):
    """At start (LayoutError), and on a hot reload (409, the old model keeps serving)."""
    plain = tiny_bundle(tmp_path / "plain")
    with pytest.raises(LayoutError, match="slot"):
        app_for(world, plain)
    live = tmp_path / "live"
    shutil.copytree(world["bundle"], live)
    with TestClient(app_for(world, live)) as client:
        shutil.rmtree(live)
        shutil.copytree(plain, live)
        r = client.post("/v1/admin/reload", headers={"Authorization": "Bearer t"})
        assert r.status_code == 409 and "slot" in r.text, r.text
        assert client.get("/readyz").json()["status"] == "ready"


def test_replay_runs_on_the_new_columns(world):
    for arm in replay_arms(world).values():
        assert arm["errors"] == 0 and arm["event_errors"] == 0, arm

"""A list<int64> sequence column online (issue 15's last gap): the synth's `tags` (1–3 ids per
event) declared as a sequence column is packed into the online store as a fixed-width subarray
(W = the longest list, recorded in `{prefix}:meta`), so the served history carries it and online
scores equal the offline predictions within 1e-5 — and would not with the lists left empty.
`longer store load` round-trips the lists and keeps or refuses a recorded width; /v1/events
takes lists (422 naming the event, the column and W for one too long); the fallback history
takes them; the replay sends them; a service started with Redis down reads W when Redis
answers; a store of another layout or width is refused at start, on /readyz and on a hot
reload."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from feature_store.online import LayoutError, OnlineStore, StoreMeta, connect, event_lists
from serving.app import create_app
from serving.runtime import ModelRuntime
from serving.settings import Settings
from serving.state_cache import history_events
from tests.conftest import fresh_prefix
from tests.serving_utils import delete_prefix, free_port, start_redis_server, stop_process, tiny_bundle
from tests.test_new_column_by_config import REDIS, replay_arms, trained_world
from tests.test_new_column_by_config import app_for as served_app

pytestmark = pytest.mark.slow

FEATURES = """
[features]
sequence = ["category_id", "action", "tags"]
candidate = ["category_id", "tags"]
"""
AUTH = {"Authorization": "Bearer t"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with trained_world(tmp_path_factory.mktemp("list_sequence"), FEATURES, seed=4) as w:
        yield w


def app_for(world, bundle=None):
    return served_app(world, bundle, refresh=False)


def longest_tags(data) -> int:
    seq = pq.read_table(data / "sequences", columns=["tags"]).column("tags").to_pylist()
    return max(len(t) for user in seq for t in user)


def test_store_load_round_trips_the_lists_and_records_the_width(world):
    data, prefix = world["data"], world["prefix"]
    assert world["loaded"]["widths"] == {"tags": longest_tags(data)} == {"tags": 3}
    meta = StoreMeta.from_json("meta", connect(REDIS).get(f"{prefix}:meta"))
    assert meta.widths == {"tags": 3} and "tags" in meta.event_fields
    spec = ModelRuntime(str(world["bundle"])).spec
    store = OnlineStore(connect(REDIS), max_len=1000, prefix=prefix, spec=spec)
    seq = pq.read_table(data / "sequences").to_pydict()
    for i in range(0, len(seq["user_id"]), 7):
        events, _, _ = store.read(seq["user_id"][i])
        want = seq["tags"][i]  # every event (max_len 1000)
        ids, lengths = event_lists(events, "tags")
        assert lengths.tolist() == [len(t) for t in want]
        assert ids.tolist() == [v for t in want for v in t]
        assert events["item_id"].tolist() == seq["item_id"][i]
    # loading again keeps the recorded width; a store recording a narrower one is refused
    again = OnlineStore(connect(REDIS), max_len=1000, prefix=prefix, spec=spec)
    assert again.load(data, spec, progress=False)["widths"] == {"tags": 3}
    narrow = fresh_prefix()
    try:
        fields = ("ts", "item_id", "category_id", "action", "tags", "label")
        connect(REDIS).set(f"{narrow}:meta", StoreMeta(fields, widths={"tags": 2}).to_json())
        store = OnlineStore(connect(REDIS), max_len=32, prefix=narrow, spec=spec)
        with pytest.raises(LayoutError, match=r"longest 'tags' list of sequences/ has 3 ids.* packs 2"):
            store.load(data, spec, progress=False)
        assert list(connect(REDIS).scan_iter(match=f"{narrow}:{{u*")) == []  # nothing written
    finally:
        delete_prefix(connect(REDIS), narrow)


def test_online_scores_equal_offline_with_a_list_sequence_column(world):
    ev = pq.read_table(world["data"] / "eval").to_pydict()
    pred = pq.read_table(world["preds"]).to_pydict()
    rows = np.random.default_rng(0).choice(len(ev["user_id"]), 20, replace=False)
    emptied = []  # |score with the history's lists left empty - offline|, per row
    with TestClient(app_for(world)) as client:
        svc = client.app.state.service
        rt = svc.runtime
        for i in rows:
            cand = {"item_id": ev["item_id"][i], "category_id": ev["category_id"][i], "tags": ev["tags"][i]}
            r = client.post(
                "/v1/score", json={"user_id": ev["user_id"][i], "ts": ev["ts"][i], "candidates": [cand]}
            )
            assert r.status_code == 200, r.text
            assert pred["row_id"][i] == i
            assert abs(r.json()["scores"][0] - pred["prediction"][i]) < 1e-5, (
                i,
                r.json(),
                pred["prediction"][i],
            )
            # the old online path: the same events with every list empty
            events, _, _ = svc.store.read(ev["user_id"][i])
            events = events[events["ts"] < ev["ts"][i]]
            events["tags"] = -1
            state = rt.encode(ev["user_id"][i], events)
            cands, _ = rt.candidates([rt.models.candidate(**cand)], {}, ev["ts"][i])
            emptied.append(abs(rt.score(state, cands)[0] - pred["prediction"][i]))
    assert max(emptied) > 1e-4, emptied  # the lists matter: this test would catch them served empty


def test_events_take_lists_and_refuse_bad_ones_naming_the_column(world):
    user = 999_002
    base = {"user_id": user, "item_id": 5, "ts": 1_800_000_000}
    with TestClient(app_for(world)) as client:
        store = client.app.state.service.store
        bad = [
            ({**base, "tags": [1, 2, 3, 4]}, "at most 3 ids in 'tags'"),  # longer than W
            ({**base, "tags": ["x"]}, "tags"),
            ({**base, "tags": [-1]}, "tags"),  # ids are non-negative: -1 is only padding
            ({**base, "tags": 4}, "tags"),  # a list column takes a list
        ]
        for event, words in bad:
            r = client.post("/v1/events", json={"events": [base, event]}, headers=AUTH)
            assert r.status_code == 422 and words in r.text, r.text
            assert r.json()["detail"][0]["loc"][:4] == ["body", "events", 1, "tags"], r.text
        assert store.read(user)[0].size == 0  # a refused call appends nothing
        events = [
            {**base, "tags": [0, 9], "event_id": "a"},  # 0 is an id
            {**base, "ts": base["ts"] + 1, "tags": [7, 7, 7], "event_id": "b"},  # exactly W
            {**base, "ts": base["ts"] + 2, "event_id": "c"},  # left out: the empty list
        ]
        r = client.post("/v1/events", json={"events": events}, headers=AUTH)
        assert r.status_code == 200 and r.json()["appended"] == 3, r.text
        ids, lengths = event_lists(store.read(user)[0], "tags")
        assert ids.tolist() == [0, 9, 7, 7, 7] and lengths.tolist() == [2, 3, 0]
        props = client.get("/openapi.json").json()["components"]["schemas"]["Event"]["properties"]
        assert props["tags"]["type"] == "array"
        # the lists reach the model: two users alike but for one event's tags score apart
        body = {"ts": base["ts"] + 10, "candidates": [{"item_id": 5, "tags": [1]}]}
        for u, tags in ((999_003, [1, 2]), (999_004, [40, 41])):
            client.post("/v1/events", json={"events": [{**base, "user_id": u, "tags": tags}]}, headers=AUTH)
        a, b = (
            client.post("/v1/score", json={**body, "user_id": u}).json()["scores"] for u in (999_003, 999_004)
        )
        assert a != b


def test_the_fallback_history_carries_the_lists(world):
    """/v1/score's `history` (used when the store is unreachable) is packed as the store's events
    are: the same encode from either."""
    rt = ModelRuntime(str(world["bundle"]))
    spec = rt.spec
    store = OnlineStore(connect(REDIS), max_len=32, prefix=world["prefix"], spec=spec)
    user = pq.read_table(world["data"] / "sequences", columns=["user_id"]).column("user_id")[0].as_py()
    stored, _, _ = store.read(user)
    history = [
        rt.models.history_event(
            item_id=int(e["item_id"]),
            ts=int(e["ts"]),
            category_id=int(e["category_id"]),
            action=int(e["action"]),
            label=int(e["label"]),
            tags=[int(v) for v in e["tags"] if v >= 0],
        )
        for e in stored[::-1]  # any order: sorted as the store sorts
    ]
    inline = history_events(history, int(stored["ts"].max()) + 1, spec)
    assert inline.dtype["tags"].shape == (3,)
    a, b = rt.encode(user, inline), rt.encode(user, stored)
    for k, t in a.tensors.items():
        assert np.allclose(t.numpy(), b.tensors[k].numpy(), atol=1e-6), k


def test_a_store_of_another_layout_or_width_is_refused(world, tmp_path):
    """At start (LayoutError), on /readyz (503 while the recorded width differs from the one in
    use) and on a hot reload (409, the old model keeps serving)."""
    plain = tiny_bundle(tmp_path / "plain")
    with pytest.raises(LayoutError, match=r"tags\[3\]"):
        app_for(world, plain)  # a default-spec bundle on a store whose events carry tags
    r = connect(REDIS)
    meta_key = f"{world['prefix']}:meta"
    saved = r.get(meta_key)
    live = tmp_path / "live"
    shutil.copytree(world["bundle"], live)
    try:
        with TestClient(app_for(world, live)) as client:
            assert client.get("/readyz").json()["status"] == "ready"
            meta = json.loads(saved)
            r.set(meta_key, json.dumps({**meta, "widths": {"tags": 5}}))  # reloaded with another W
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "list widths changed" in ready.json()["redis"], ready.text
            r.set(meta_key, saved)
            assert client.get("/readyz").status_code == 200
            shutil.rmtree(live)
            shutil.copytree(plain, live)
            reload = client.post("/v1/admin/reload", headers=AUTH)
            assert reload.status_code == 409 and "tags[3]" in reload.text, reload.text
        # a store recording tags as a scalar: refused at start, naming the column
        r.set(meta_key, json.dumps({**json.loads(saved), "widths": {}}))
        with pytest.raises(LayoutError, match=r"tags\[W\]"):
            app_for(world)
    finally:
        r.set(meta_key, saved)


def test_a_service_started_with_redis_down_reads_the_widths_when_it_answers(world, tmp_path):
    """The widths are the store's: a service that could not read them at start scores from the
    request's history (lists included) and answers /v1/events 503 until Redis answers, then
    reads them on first use — and scores the same history the same from the store."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = Settings(model=str(world["bundle"]), redis_url=url, token="t", refresh=False)
    app = create_app(settings)  # Redis down: starts, degraded
    seq = pq.read_table(world["data"] / "sequences").to_pydict()
    fields = ("item_id", "ts", "category_id", "action", "label", "tags")
    history = [dict(zip(fields, e)) for e in zip(*(seq[k][0] for k in fields))]
    ts = max(e["ts"] for e in history) + 1
    body = {
        "user_id": seq["user_id"][0],
        "ts": ts,
        "candidates": [{"item_id": 5, "category_id": 2, "tags": [1]}],  # all given: no item-table fill-in
        "history": history,
    }
    event = {"user_id": 1, "item_id": 2, "ts": ts, "tags": [1, 2, 3, 4]}
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        bypass = client.post("/v1/score", json=body).json()
        assert bypass["user_state"] == "bypass"
        assert client.post("/v1/events", json={"events": [event]}, headers=AUTH).status_code == 503
        proc = start_redis_server(port, tmp_path / "redis")
        try:
            store = OnlineStore(connect(url), max_len=1000, spec=client.app.state.service.runtime.spec)
            store.load(world["data"], store_spec(world), progress=False)
            assert client.get("/readyz").status_code == 200
            online = client.post("/v1/score", json=body).json()
            assert online["user_state"] == "full" and abs(online["scores"][0] - bypass["scores"][0]) < 1e-5
            r = client.post("/v1/events", json={"events": [event]}, headers=AUTH)
            assert r.status_code == 422 and "at most 3 ids in 'tags'" in r.text, r.text
        finally:
            stop_process(proc)


def store_spec(world):
    """The spec `longer store load` lays the world's dataset out by."""
    from feature_store.builder import dataset_spec, read_meta

    return dataset_spec(read_meta(world["data"]))


def test_replay_sends_the_lists(world):
    for arm in replay_arms(world).values():
        assert arm["errors"] == 0 and arm["event_errors"] == 0, arm

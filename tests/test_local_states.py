"""Cached user states held decoded in process (serving/local_states.py): a hit with no state
payload and no decode, used only while the store still holds that very value — never after
another replica wrote another value (even under the same tag), new events, a profile PUT or a
hot reload."""

import contextlib
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from feature_store import codec
from feature_store.online import OnlineStore
from serving.app import create_app
from serving.local_states import LocalStates
from serving.runtime import ModelRuntime
from serving.settings import Settings
from tests.serving_utils import shared_redis, tiny_bundle, user_store

USER, T0 = 43, 1_700_000_000
AUTH = {"Authorization": "Bearer tok"}


def test_local_states_are_an_lru_bounded_in_bytes():
    local = LocalStates(100)
    local.put(("m", 1), b"d1", "one", 40)
    local.put(("m", 2), b"d2", "two", 40)
    assert local.get(("m", 1)) == (b"d1", "one")  # now the most recently used
    local.put(("m", 3), b"d3", "three", 40)  # 120 > 100: user 2 goes
    assert local.get(("m", 2)) is None and len(local) == 2 and local.bytes == 80
    local.put(("m", 1), b"d1b", "one again", 30)  # replaced, not added
    assert local.get(("m", 1)) == (b"d1b", "one again") and local.bytes == 70
    local.put(("m", 4), b"d4", "huge", 101)  # larger than the budget: not held
    assert local.get(("m", 4)) is None and local.bytes == 70
    local.put(("m", 3), b"", "no digest", 10)  # nothing to compare with the store: not held
    assert local.get(("m", 3)) is None
    local.drop(("m", 1))
    assert len(local) == 0 and local.bytes == 0
    off = LocalStates(0)
    off.put(("m", 1), b"d", "x", 1)
    assert off.get(("m", 1)) is None


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("local") / "bundle", encoding="append_stable")


@pytest.fixture
def store():
    with user_store(USER, T0, 30) as s:
        yield s


@contextlib.contextmanager
def replica(bundle, store: OnlineStore, mb: int = 256):
    """A client of another app (another replica: its own process state) over the same keys."""
    own = OnlineStore(shared_redis(), max_len=store.max_len, prefix=store.prefix)
    settings = Settings(model=str(bundle), token="tok", refresh=False, state_cache_mb=mb)
    with TestClient(create_app(settings, runtime=ModelRuntime(str(bundle)), store=own)) as client:
        yield client


def score(client, ts=T0 + 10_000):
    body = {"user_id": USER, "candidates": [{"item_id": 7}, {"item_id": 8}, {"item_id": 9}], "ts": ts}
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def local(client, result: str) -> float:
    svc = client.app.state.service
    return svc.metrics.registry.get_sample_value("longer_state_local_total", {"result": result})


def state_key(client, store) -> str:
    return store._key(USER, f"st:{client.app.state.service.runtime.model_version}")


def test_a_held_state_is_used_while_the_store_holds_that_value(bundle, store, monkeypatch):
    with replica(bundle, store) as a, replica(bundle, store, mb=0) as plain:
        assert score(a)["user_state"] == "full"  # and the write-back holds its decode
        replies = []
        later = a.app.state.service.store.read_head_later

        def spied(*args):
            reply = later(*args)
            return lambda: replies.append(r := reply()) or r

        monkeypatch.setattr(a.app.state.service.store, "read_head_later", spied)
        hits = [score(a) for _ in range(3)]
        assert {h["user_state"] for h in hits} == {"hit"} and hits[0] == hits[1] == hits[2]
        assert (local(a, "hit"), local(a, "miss")) == (3, 0)
        assert [len(r[2]) for r in replies] == [16] * 3  # the digest only: no state payload
        assert score(plain) == hits[0]  # what a replica reading and decoding the value gives
        assert (local(plain, "hit"), local(plain, "miss")) == (0, 1)  # 0 MB: nothing held
        assert "longer_state_local_bytes" in a.get("/metrics").text


def test_a_hit_scores_the_held_state_while_the_store_answers(bundle, store, monkeypatch):
    """The early score: the head's request is sent, the held state scored, then the reply read
    — and a score of a held state the reply shows stale (new events) is never answered."""
    with replica(bundle, store) as a, replica(bundle, store, mb=0) as plain:
        svc = a.app.state.service
        score(a)
        steps = []
        later, scored = svc.store.read_head_later, svc.runtime.score

        def spied_read(*args):
            steps.append("sent")
            reply = later(*args)
            return lambda: steps.append("reply") or reply()

        monkeypatch.setattr(svc.store, "read_head_later", spied_read)
        monkeypatch.setattr(svc.runtime, "score", lambda *args: steps.append("score") or scored(*args))
        hit = score(a)
        assert hit["user_state"] == "hit" and steps == ["sent", "score", "reply"]
        assert hit == {**score(plain), "user_state": "hit"}
        event = {"user_id": USER, "item_id": 900, "ts": T0 + 20_000, "category_id": 1}
        assert plain.post("/v1/events", json={"events": [event]}, headers=AUTH).json()["appended"] == 1
        steps.clear()
        updated = score(a, T0 + 30_000)  # another replica's events: scored early, found stale
        assert updated["user_state"] == "incremental" and steps == ["sent", "score", "reply", "score"]
        store.r.delete(state_key(a, store))
        full = score(plain, T0 + 30_000)
        np.testing.assert_allclose(updated["scores"], full["scores"], atol=1e-5)
        assert not np.allclose(updated["scores"], hit["scores"], atol=1e-4)
        event = {**event, "item_id": 901, "ts": T0 + 20_001}
        assert a.post("/v1/events", json={"events": [event]}, headers=AUTH).json()["appended"] == 1
        steps.clear()
        assert score(a, T0 + 30_000)["user_state"] == "incremental"  # its own events: known stale
        assert steps == ["sent", "reply", "score"]


def test_another_value_under_the_same_tag_is_read_not_the_held_one(bundle, store):
    """Another replica writes a value the head cannot tell apart (same model, user, sequence
    version, events, total): only its bytes differ. The held decode must not be served."""
    with replica(bundle, store) as a, replica(bundle, store, mb=0) as plain:
        score(a)
        before = score(a)
        assert before["user_state"] == "hit" and local(a, "hit") == 1
        key = state_key(a, store)
        tensors, meta = codec.decode(store.r.get(key))
        other = {k: t + 0.5 if t.is_floating_point() else t for k, t in tensors.items()}
        store.r.set(key, codec.encode(other, meta=meta))
        after = score(a)
        assert after["user_state"] == "hit" and local(a, "miss") == 1
        assert not np.allclose(after["scores"], before["scores"], atol=1e-3)
        assert after == score(plain)
        assert score(a) == after and local(a, "hit") == 2  # the new value is held now


def test_new_events_and_a_newer_state_from_another_replica(bundle, store):
    with replica(bundle, store) as a, replica(bundle, store) as b, replica(bundle, store, mb=0) as plain:
        score(a)
        assert score(a)["user_state"] == "hit"
        events = [
            {"user_id": USER, "item_id": 900 + i, "ts": T0 + 20_000 + i, "category_id": 1} for i in range(3)
        ]
        assert b.post("/v1/events", json={"events": events}, headers=AUTH).json()["appended"] == 3
        updated = score(a, T0 + 30_000)  # a holds the old value: its tag is an older sequence's
        assert updated["user_state"] == "incremental"
        store.r.delete(state_key(a, store))
        full = score(plain, T0 + 30_000)
        assert full["user_state"] == "full"
        np.testing.assert_allclose(updated["scores"], full["scores"], atol=1e-5)
        # b answers the next events and writes the newer state; a still holds the older one
        more = [{**e, "item_id": e["item_id"] + 10, "ts": e["ts"] + 100} for e in events]
        assert b.post("/v1/events", json={"events": more}, headers=AUTH).json()["appended"] == 3
        by_b = score(b, T0 + 30_000)
        assert by_b["user_state"] == "incremental"  # from the state plain wrote back
        misses = local(a, "miss")
        from_b = score(a, T0 + 30_000)  # b's value is the store's now: read, not the held one
        assert from_b == {**by_b, "user_state": "hit"} and local(a, "miss") == misses + 1
        assert score(a, T0 + 30_000) == from_b and local(a, "miss") == misses + 1


def test_a_profile_put_is_never_answered_from_the_held_state(bundle, store):
    with replica(bundle, store) as a, replica(bundle, store) as b:
        score(a)
        assert score(a)["user_state"] == "hit"
        assert b.put(f"/v1/users/{USER}", json={}, headers=AUTH).status_code == 200
        assert score(a)["user_state"] == "full"  # the PUT bumped ver and deleted the state
        assert score(a)["user_state"] == "hit"


def test_a_hot_reload_drops_the_held_states(bundle, store, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(bundle, live)
    own = OnlineStore(shared_redis(), max_len=store.max_len, prefix=store.prefix)
    settings = Settings(model=str(live), token="tok", refresh=False)
    with TestClient(create_app(settings, store=own)) as a:
        score(a)
        before = score(a)
        assert before["user_state"] == "hit"
        other = tiny_bundle(tmp_path / "other", seed=1, encoding="append_stable")
        shutil.rmtree(live)
        shutil.copytree(other, live)
        reloaded = a.post("/v1/admin/reload", headers=AUTH).json()
        assert reloaded["reloaded"] is True
        assert len(a.app.state.service.cache.local) == 0
        after = score(a)
        assert after["user_state"] == "full" and after["model_version"] != before["model_version"]
        assert not np.allclose(after["scores"], before["scores"], atol=1e-4)
        held = a.app.state.service.cache.local
        assert len(held) == 1 and held.get((after["model_version"], USER)) is not None


def test_a_state_the_store_refuses_is_not_held(bundle, store):
    with replica(bundle, store) as a:
        a.app.state.service.store.state_max_bytes = 10  # every value too large to cache
        assert [score(a)["user_state"] for _ in range(2)] == ["full", "full"]
        assert len(a.app.state.service.cache.local) == 0 and local(a, "hit") == 0
        assert torch.get_num_threads() >= 1

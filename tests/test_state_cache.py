"""The user-state cache's outcomes with an append-stable bundle (serving/state_cache.py): a
stale state brought up to date with only the new events ("incremental") equals a full encode
within 1e-5, and every case where that would not hold is a full encode instead."""

import asyncio
import logging

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from feature_store.online import Event
from serving import state_cache
from serving.app import create_app
from serving.runtime import ModelRuntime
from serving.settings import Settings
from serving.state_cache import UserStateCache, state_tag
from tests.serving_utils import prefixed_store, shared_redis, tiny_bundle

USER, T0 = 41, 1_700_000_000
AUTH = {"Authorization": "Bearer tok"}


@pytest.fixture(scope="module")
def stable_bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("stable") / "bundle", encoding="append_stable")


@pytest.fixture
def served(stable_bundle):
    """(client, app, store): an append-stable bundle over a fresh prefix, USER with 30 events."""
    with prefixed_store(shared_redis(), max_len=64) as store:
        store.append([Event(USER, 100 + i, T0 + 60 * i, category_id=i % 5) for i in range(30)])
        settings = Settings(model=str(stable_bundle), token="tok", refresh=False)
        app = create_app(settings, runtime=ModelRuntime(str(stable_bundle)), store=store)
        with TestClient(app) as client:
            yield client, app, store


def append(client, n, start, ts0, user=USER):
    events = [
        {"user_id": user, "item_id": 500 + start + i, "ts": ts0 + i, "category_id": 2} for i in range(n)
    ]
    r = client.post("/v1/events", json={"events": events}, headers=AUTH)
    assert r.status_code == 200 and r.json()["appended"] == n, r.text


def score(client, ts, user=USER):
    body = {"user_id": user, "candidates": [{"item_id": 7}, {"item_id": 8}], "ts": ts}
    return client.post("/v1/score", json=body).json()


def full_state(app, store, user=USER):
    """The state a full encode of every held event gives, and the cached one."""
    rt, cache = app.state.service.runtime, app.state.service.cache
    held, version, blob, total = store.read_head(user, rt.model_version)
    cached = cache.loads(rt, blob, state_tag(user, version, held, total))
    events = store.read(user)[0]
    return rt.encode(user, events, {}, total), cached


def assert_states_close(a, b):
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_new_events_update_the_cached_state_incrementally(served):
    client, app, store = served
    first = score(client, T0 + 10_000)
    assert first["user_state"] == "full"
    assert score(client, T0 + 10_000)["user_state"] == "hit"
    for n, at in ((1, T0 + 20_000), (10, T0 + 30_000)):
        append(client, n, at - T0, at)
        out = score(client, at + 5_000)
        assert out["user_state"] == "incremental"
        encoded, cached = full_state(app, store)
        assert cached is not None  # written back, tagged with the new total
        assert_states_close(cached, encoded)
        assert score(client, at + 5_000) == {**out, "user_state": "hit"}
        store.r.delete(store._key(USER, f"st:{app.state.service.runtime.model_version}"))
        again = score(client, at + 5_000)
        assert again["user_state"] == "full"
        np.testing.assert_allclose(again["scores"], out["scores"], atol=1e-5)


def test_only_the_new_events_are_read(served, monkeypatch):
    client, _app, store = served
    score(client, T0 + 10_000)
    append(client, 3, 0, T0 + 20_000)
    seen = []
    read = store.read_since
    monkeypatch.setattr(store, "read_since", lambda *a: seen.append(r := read(*a)) or r)
    assert score(client, T0 + 30_000)["user_state"] == "incremental"
    assert [(r.complete, len(r.events)) for r in seen] == [(True, 3)]  # the tail: 3 of the 33


@pytest.mark.parametrize(
    "case", ["request_before_new_event", "out_of_order", "trimmed", "unreadable", "profile", "recency"]
)
def test_a_full_encode_where_an_update_would_differ(served, case, tmp_path):
    client, app, store = served
    svc = app.state.service
    if case == "recency":  # no incremental update for a recency bundle
        recency = tiny_bundle(tmp_path / "recency")
        svc.runtime = ModelRuntime(str(recency))
    assert score(client, T0 + 10_000)["user_state"] == "full"
    rt = svc.runtime
    if case == "request_before_new_event":  # the new event is not history yet at the request time
        append(client, 1, 0, T0 + 20_000)
        assert score(client, T0 + 19_000)["user_state"] == "full"
        return
    if case == "out_of_order":  # an event older than the state's latest: another sequence order
        append(client, 1, 0, T0 + 60 * 29 - 1)
    elif case == "trimmed":  # more new events than the list keeps (64): some are gone
        append(client, 70, 0, T0 + 20_000)
    elif case == "unreadable":  # a new item that does not unpack: the events read are one short
        append(client, 2, 0, T0 + 20_000)
        store.r.rpush(store._key(USER, "seq"), b"short")
        store.r.incr(store._key(USER, "tot"))
    elif case == "profile":  # a state computed with another profile, left from a racing write-back
        held, version, blob, total = store.read_head(USER, rt.model_version)
        state = svc.cache.loads(rt, blob, state_tag(USER, version, held, total))
        assert client.put(f"/v1/users/{USER}", json={}, headers=AUTH).status_code == 200
        stale = svc.cache.dumps(rt, state, state_tag(USER, version, held, total), {"segment": 3})
        store.write_state(USER, rt.model_version, stale)
        append(client, 1, 0, T0 + 20_000)
    else:
        append(client, 1, 0, T0 + 20_000)
    out = score(client, T0 + 50_000)
    assert out["user_state"] == "full"
    if case == "unreadable":  # and the full read finds the state again: no incremental from it
        assert score(client, T0 + 50_000) == {**out, "user_state": "hit"}
        append(client, 1, 10, T0 + 40_000)
        assert score(client, T0 + 50_000)["user_state"] == "full"
    elif case != "recency":
        encoded, cached = full_state(app, store)
        assert_states_close(cached, encoded)


def test_a_profile_put_forces_a_full_encode(served):
    client, _app, _store = served
    score(client, T0 + 10_000)
    assert client.put(f"/v1/users/{USER}", json={}, headers=AUTH).status_code == 200
    assert score(client, T0 + 10_000)["user_state"] == "full"
    append(client, 1, 0, T0 + 20_000)
    assert score(client, T0 + 30_000)["user_state"] == "incremental"  # the new state is the new profile's


def test_concurrent_requests_update_once(served):
    client, app, _store = served
    svc = app.state.service
    score(client, T0 + 10_000)
    append(client, 2, 0, T0 + 20_000)
    calls = []
    update = svc.runtime.update

    def counting(*a):
        calls.append(1)
        __import__("time").sleep(0.2)  # hold it so the others arrive while it runs
        return update(*a)

    svc.runtime.update = counting

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"user_id": USER, "candidates": [{"item_id": 7}], "ts": T0 + 30_000}
            return [
                r.json() for r in await asyncio.gather(*[c.post("/v1/score", json=body) for _ in range(6)])
            ]

    out = asyncio.run(burst())
    assert {r["user_state"] for r in out} == {"incremental"} and len(calls) == 1


@pytest.mark.parametrize("waiting", [0, 1])
@pytest.mark.parametrize("ending", ["cancelled", "failed"])
def test_a_single_flight_that_ends_badly_logs_no_unretrieved_future(caplog, ending, waiting):
    """A computation cancelled (the refresh at shutdown) or failed, with or without another
    request waiting for it, leaves no 'Future exception was never retrieved' behind (the demo's
    replay printed one at shutdown); a waiter sees the same ending."""
    import gc

    started = asyncio.Event()

    async def run(fn, *args):
        started.set()
        await asyncio.sleep(3600 if ending == "cancelled" else 0)
        raise ValueError("encode failed")

    cache = UserStateCache(store=None, run=run, redis=run)

    async def main():
        lone = asyncio.create_task(cache.once(("m", 1, 1, 1), None))
        await started.wait()
        waiters = [asyncio.create_task(cache.once(("m", 1, 1, 1), None)) for _ in range(waiting)]
        await asyncio.sleep(0)
        if ending == "cancelled":
            lone.cancel()
        results = await asyncio.gather(lone, *waiters, return_exceptions=True)
        expected = asyncio.CancelledError if ending == "cancelled" else ValueError
        assert all(isinstance(r, expected) for r in results), results
        assert not cache.inflight

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main())
        gc.collect()
    assert "never retrieved" not in caplog.text


def test_a_held_state_older_than_a_version_this_process_moved_is_known_stale(monkeypatch):
    monkeypatch.setattr(state_cache, "MOVED_USERS", 2)
    cache = UserStateCache(store=None, run=None, redis=None)
    held = lambda version: (None, {"seq_version": version})  # noqa: E731
    cache.moved({1: 5, 2: 3})
    assert cache.known_stale(held(4), 1) and not cache.known_stale(held(5), 1)
    assert not cache.known_stale(held(0), 7)  # never moved here: not known
    cache.moved({3: 1})  # beyond MOVED_USERS: the least recently moved user is forgotten
    assert not cache.known_stale(held(0), 1) and cache.known_stale(held(2), 2)
    assert not cache.may_score_early(held(2), 2, ts=10**9)

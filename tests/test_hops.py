"""serving/hops.py: a /v1/score hit alone in the server reads and scores on the event loop's
thread, and hops to the pool whenever it is not alone, LONGER_IDLE_INLINE is off, a call is in
the pool, or the store's last call failed — with the same answers either way."""

import asyncio
import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from fastapi.testclient import TestClient

from bench.hit_profile import asgi_post
from serving.app import create_app
from serving.hops import Hops
from serving.runtime import ModelRuntime
from serving.settings import Settings
from tests.serving_utils import tiny_bundle, user_store

USER, T0 = 45, 1_700_000_000
BODY = {"user_id": USER, "candidates": [{"item_id": 7}, {"item_id": 8}], "ts": T0 + 10_000}


def test_a_call_runs_inline_only_when_every_condition_holds():
    hops = Hops(inline=True)
    assert hops.alone()
    with hops.request():
        assert hops.alone()
        with hops.request():
            assert not hops.alone()  # another /v1/score request in the handler
    hops.store_ok = False
    assert not hops.alone()
    hops.store_ok = True
    hops.pooled = 1
    assert not hops.alone()
    assert not Hops(inline=False).alone()


def test_a_pooled_call_counts_until_it_returns_there_even_when_its_request_is_cancelled():
    hops, pool, release = Hops(), ThreadPoolExecutor(2), threading.Event()

    async def main():
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(hops.submit(loop, pool, release.wait))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.sleep(0.05)
        assert hops.pooled == 1  # still running in its thread
        release.set()
        with pytest.raises(ZeroDivisionError):
            await hops.submit(loop, pool, lambda: 1 / 0)
        for _ in range(100):
            if hops.pooled == 0:
                break
            await asyncio.sleep(0.01)
        assert hops.pooled == 0
        pool.shutdown()
        with pytest.raises(RuntimeError):
            hops.submit(loop, pool, print)
        assert hops.pooled == 0

    asyncio.run(main())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("hops") / "bundle")


@pytest.fixture
def store():
    with user_store(USER, T0, 20) as s:
        yield s


@contextlib.contextmanager
def served(bundle, store, inline: bool = True):
    settings = Settings(model=str(bundle), refresh=False, idle_inline=inline)
    with TestClient(create_app(settings, runtime=ModelRuntime(str(bundle)), store=store)) as client:
        yield client


def hit_threads(client, monkeypatch) -> list[str]:
    """The names of the threads each later hit read ran on."""
    cache, names = client.app.state.service.cache, []
    read_hit = cache.read_hit
    monkeypatch.setattr(
        cache, "read_hit", lambda *a: names.append(threading.current_thread().name) or read_hit(*a)
    )
    return names


def reads(app) -> tuple[float, float]:
    m = app.state.service.metrics.registry
    return tuple(m.get_sample_value("longer_hit_reads_total", {"thread": t}) for t in ("event_loop", "pool"))


def score(client) -> dict:
    r = client.post("/v1/score", json=BODY)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_lone_hit_runs_on_the_event_loop_and_answers_as_the_pool_does(bundle, store, monkeypatch):
    with served(bundle, store) as inline, served(bundle, store, inline=False) as pooled:
        assert score(inline)["user_state"] == "full"
        names = hit_threads(inline, monkeypatch)
        hit = score(inline)
        assert hit["user_state"] == "hit" and not names[0].startswith("longer-model")
        assert reads(inline.app) == (2, 0)  # the full's first read too
        pool_names = hit_threads(pooled, monkeypatch)
        assert score(pooled) == hit and pool_names[0].startswith("longer-model")
        assert reads(pooled.app) == (0, 1)


def test_a_hit_hops_beside_another_request_and_after_a_store_failure(bundle, store, monkeypatch):
    with served(bundle, store) as client:
        svc = client.app.state.service
        hit = score(client) and score(client)
        names = hit_threads(client, monkeypatch)
        with svc.hops.request():  # another /v1/score request in the handler
            assert score(client) == hit
        assert names.pop().startswith("longer-model")
        later = svc.store.read_head_later

        def down(*args):
            raise redis.ConnectionError("Redis went away")

        monkeypatch.setattr(svc.store, "read_head_later", down)
        assert score(client)["user_state"] == "bypass"  # inline: the store was fine until then
        names.clear()
        monkeypatch.setattr(svc.store, "read_head_later", later)
        assert score(client) == hit and names.pop().startswith("longer-model")  # after the failure
        assert score(client) == hit and not names.pop().startswith("longer-model")  # it answered again


def test_requests_that_arrive_together_all_hop(bundle, store):
    """Without the yield before deciding, the first of them found itself alone and ran inline
    while the others waited unread."""
    app = create_app(
        Settings(model=str(bundle), refresh=False), runtime=ModelRuntime(str(bundle)), store=store
    )
    body = json.dumps(BODY).encode()

    async def main():
        for _ in range(2):  # a full, then a lone hit
            await asgi_post(app, "/v1/score", body)
        alone = reads(app)
        answers = await asyncio.gather(*(asgi_post(app, "/v1/score", body) for _ in range(3)))
        return alone, answers

    try:
        alone, answers = asyncio.run(main())
    finally:
        app.state.service.pool.shutdown()
    assert alone == (2, 0) and reads(app) == (2, 3)
    assert {status for status, _ in answers} == {200} and len({text for _, text in answers}) == 1

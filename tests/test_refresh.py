"""Near-line refresh (serving/refresh.py): coalescing per user, a bounded queue that drops,
the off switch, clean shutdown, and — in the app — an event's refresh making the user's next
request a hit, with the metrics to show it."""

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from feature_store.online import Event
from serving.app import create_app
from serving.metrics import Metrics
from serving.refresh import Refresher
from serving.runtime import ModelRuntime
from serving.settings import Settings
from tests.serving_utils import prefixed_store, shared_redis, tiny_bundle

USER, T0 = 43, 1_700_000_000
AUTH = {"Authorization": "Bearer tok"}


class HeldCache:
    """A UserStateCache stand-in whose refreshes wait for `release`."""

    def __init__(self):
        self.calls: list[int] = []
        self.release = asyncio.Event()

    async def refresh(self, rt, user):
        self.calls.append(user)
        await self.release.wait()
        return "incremental"


def sample(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_events_for_a_queued_or_running_user_coalesce():
    async def go():
        cache, metrics = HeldCache(), Metrics()
        r = Refresher(cache, lambda: None, metrics, max_queue=10)
        r.schedule([1, 1, 2, 1])  # 1 queued once; the repeats coalesce
        assert sample(metrics, "longer_refresh_coalesced_total") == 2
        assert sample(metrics, "longer_refresh_queue_depth") == 2
        await asyncio.sleep(0.01)  # the worker takes user 1 and holds it
        assert cache.calls == [1] and r.running == {1}
        r.schedule([1, 1])  # running: one more run afterwards, however many events
        cache.release.set()
        await r.idle()
        assert cache.calls == [1, 2, 1]
        assert sample(metrics, "longer_refresh_total", result="incremental") == 3
        assert sample(metrics, "longer_refresh_seconds_count") == 3
        await r.close()
        assert r.workers == []

    asyncio.run(go())


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    async def go():
        cache, metrics = HeldCache(), Metrics()
        r = Refresher(cache, lambda: None, metrics, max_queue=2)
        r.schedule(range(5))  # the worker has not run yet: 2 fit, 3 dropped, no wait
        assert sample(metrics, "longer_refresh_dropped_total") == 3
        assert sample(metrics, "longer_refresh_queue_depth") == 2
        cache.release.set()
        await r.idle()
        assert cache.calls == [0, 1]
        await r.close()

    asyncio.run(go())


def test_off_schedules_nothing_and_close_cancels_a_running_refresh():
    async def go():
        cache, metrics = HeldCache(), Metrics()
        off = Refresher(cache, lambda: None, metrics, enabled=False)
        off.schedule([1, 2])
        assert off.queue is None and off.workers == [] and cache.calls == []
        on = Refresher(cache, lambda: None, metrics)
        on.schedule([3])
        await asyncio.sleep(0.01)
        assert cache.calls == [3]  # held mid-refresh
        tasks = list(on.workers)
        await on.close()
        assert all(t.done() for t in tasks)  # cancelled and awaited: nothing outlives the app

    asyncio.run(go())


def test_a_failing_refresh_is_counted_not_raised():
    class Failing:
        async def refresh(self, rt, user):
            raise ConnectionError("store down")

    async def go():
        metrics = Metrics()
        r = Refresher(Failing(), lambda: None, metrics)
        r.schedule([1])
        await r.idle()
        assert sample(metrics, "longer_refresh_total", result="error") == 1
        await r.close()

    asyncio.run(go())


@pytest.fixture(scope="module")
def stable_bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("stable") / "bundle", encoding="append_stable")


@pytest.mark.parametrize("refresh", [True, False])
def test_an_events_refresh_makes_the_next_request_a_hit(stable_bundle, refresh):
    with prefixed_store(shared_redis(), max_len=64) as store:
        store.append([Event(USER, 100 + i, T0 + 60 * i) for i in range(20)])
        settings = Settings(model=str(stable_bundle), token="tok", refresh=refresh)
        app = create_app(settings, runtime=ModelRuntime(str(stable_bundle)), store=store)
        body = {"user_id": USER, "candidates": [{"item_id": 7}], "ts": T0 + 90_000}
        with TestClient(app) as client:
            assert client.post("/v1/score", json=body).json()["user_state"] == "full"
            events = [{"user_id": USER, "item_id": 900 + i, "ts": T0 + 50_000 + i} for i in range(3)]
            assert client.post("/v1/events", json={"events": events}, headers=AUTH).status_code == 200
            metrics = app.state.service.metrics
            deadline = time.monotonic() + 30
            while refresh and sample(metrics, "longer_refresh_total", result="incremental") < 1:
                assert time.monotonic() < deadline, client.get("/metrics").text
                time.sleep(0.02)
            out = client.post("/v1/score", json=body).json()["user_state"]
            assert out == ("hit" if refresh else "incremental")
            text = client.get("/metrics").text
            for line in (
                'longer_user_state_total{result="full"} 1.0',
                f'longer_user_state_total{{result="hit"}} {float(refresh)}',
                f'longer_user_state_total{{result="incremental"}} {float(not refresh)}',
                'longer_user_state_total{result="bypass"} 0.0',
                f'longer_refresh_total{{result="incremental"}} {float(refresh)}' if refresh else "",
                "longer_refresh_queue_depth 0.0",
                f"longer_refresh_seconds_count {float(refresh)}",
                "longer_refresh_dropped_total 0.0",
            ):
                assert line in text, line
            workers = list(app.state.service.refresher.workers)
        assert all(t.done() for t in workers)  # the app's shutdown ended them

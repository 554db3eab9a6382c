"""serving/heap.py: the loaded heap frozen out of full collections when the app starts and
after a hot reload, the old heap's cycles still collected; LONGER_FREEZE_HEAP=false leaves it."""

from __future__ import annotations

import gc
import weakref

import pytest
from fastapi.testclient import TestClient

from serving import heap
from serving.app import create_app
from serving.runtime import ModelRuntime
from serving.settings import Settings
from tests.serving_utils import prefixed_store, shared_redis, tiny_bundle


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def thawed():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_settle_freezes_what_lives_and_collects_what_froze_and_died():
    kept, dropped = Node(), Node()
    gone = weakref.ref(dropped)
    assert heap.settle() > 0 and gc.get_freeze_count() > 0  # (frozen objects freed since leave the count)
    assert gc.is_tracked(kept) and not any(kept is o for o in gc.get_objects(2))  # frozen: not scanned
    del dropped
    gc.collect()
    assert gone() is not None, "a frozen cycle was collected by an ordinary collection"
    heap.settle()  # thaw first: the dead cycle is collected
    assert gone() is None
    fresh = Node()
    assert any(fresh is o for o in gc.get_objects()), "an object made after settle is frozen"


@pytest.mark.parametrize("on", [True, False])
def test_the_app_settles_at_start_unless_turned_off(tmp_path, monkeypatch, on):
    monkeypatch.setenv("LONGER_FREEZE_HEAP", str(on).lower())
    bundle = tiny_bundle(tmp_path / "b")
    with prefixed_store(shared_redis()) as store:
        app = create_app(Settings(model=str(bundle)), runtime=ModelRuntime(str(bundle)), store=store)
        assert gc.get_freeze_count() == 0
        with TestClient(app):
            assert (gc.get_freeze_count() > 0) == on
            gc.unfreeze()
            app.state.service.settle_heap()  # as a reload does
            assert (gc.get_freeze_count() > 0) == on


def test_a_reload_freezes_the_new_model_and_lets_the_old_one_go(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("LONGER_FREEZE_HEAP", "true")
    live = tmp_path / "live"
    shutil.copytree(tiny_bundle(tmp_path / "a", seed=0), live)
    with prefixed_store(shared_redis()) as store:
        app = create_app(Settings(model=str(live), token="tok"), store=store)
        with TestClient(app) as c:
            svc = app.state.service
            old = weakref.ref(svc.runtime.bundle.model)
            shutil.rmtree(live)
            shutil.copytree(tiny_bundle(tmp_path / "b", seed=1), live)
            r = c.post("/v1/admin/reload", headers={"Authorization": "Bearer tok"})
            assert r.status_code == 200 and r.json()["reloaded"], r.text
            new = svc.runtime.bundle.model
            assert not any(new is o for o in gc.get_objects()), "the new model is not frozen"
            assert old() is None, "the old model outlived the reload (frozen, or still referenced)"

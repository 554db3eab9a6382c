"""serving/runtime.py's compute slots (issue 18): concurrent model calls instead of one lock,
threads shared by the calls running, and scores that do not depend on what runs beside them;
and the candidates' column form (`CandidateColumns`) equal to the object form."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

from feature_store.online import event_dtype
from serving.runtime import CandidateColumns, ComputeSlots, ModelRuntime
from tests.serving_utils import tiny_bundle


def test_a_lone_call_gets_the_budget_and_concurrent_calls_share_it():
    slots = ComputeSlots(4, slots=2)
    with slots() as alone:
        assert alone == 4 and torch.is_inference_mode_enabled()
    inside, release, seen = threading.Barrier(3), threading.Event(), []
    third_in = threading.Event()

    def hold():
        with slots() as n:
            seen.append(n)
            inside.wait()
            release.wait()

    def third():
        with slots():
            third_in.set()

    workers = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    late = threading.Thread(target=third, daemon=True)
    try:
        inside.wait()  # both slots held
        late.start()
        assert not third_in.wait(0.2), "a third call ran while both slots were held"
        assert slots.running == 2 and sorted(seen) == [2, 4]  # the second entered with 2 running
    finally:
        release.set()
        for w in [*workers, late]:
            w.join(timeout=30)
    assert third_in.is_set() and slots.running == 0


def test_per_call_caps_a_lone_calls_threads_not_the_slots():
    slots = ComputeSlots(4, per_call=1)  # serving's default (LONGER_CALL_THREADS=1)
    assert slots.slots == 4
    with slots() as alone:
        assert alone == 1 and torch.get_num_threads() == 1
    with ComputeSlots(4, per_call=2)() as alone:
        assert alone == 2


def test_the_runtime_takes_call_threads_and_slots_from_the_settings(tmp_path, monkeypatch):
    from serving.settings import Settings

    monkeypatch.setenv("LONGER_CALL_THREADS", "3")
    assert Settings.from_env().call_threads == 3
    monkeypatch.setenv("LONGER_COMPUTE_SLOTS", "6")
    assert Settings.from_env().compute_slots == 6
    rt = ModelRuntime(str(tiny_bundle(tmp_path / "b")), threads=4, call_threads=3, slots=6)
    assert (rt.slots.slots, rt.slots.per_call) == (6, 3)
    default = ModelRuntime(str(tiny_bundle(tmp_path / "c")), threads=4).slots
    assert (default.slots, default.per_call) == (5, 1)  # the budget + 1; one thread a call


def test_concurrent_scores_equal_sequential_ones(tmp_path):
    rt = ModelRuntime(str(tiny_bundle(tmp_path / "b")), threads=2)
    rng = np.random.default_rng(0)
    events = np.zeros(40, event_dtype(rt.spec))
    events["ts"], events["item_id"] = np.arange(1, 41) * 60, rng.integers(1, 500, 40)
    state = rt.encode(7, events)
    requests = [
        [SimpleNamespace(item_id=int(i), category_id=int(c)) for i, c in rng.integers(0, 300, (20, 2))]
        for _ in range(12)
    ]
    cands = [rt.candidates(r, {}, 10_000)[0] for r in requests]
    alone = [rt.score(state, c) for c in cands]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda c: rt.score(state, c), cands))
    np.testing.assert_allclose(together, alone, atol=1e-6, rtol=0)


def test_columns_give_the_objects_tensors_and_fill_ins(tmp_path):
    rt = ModelRuntime(str(tiny_bundle(tmp_path / "b")))
    objects = [SimpleNamespace(item_id=5, category_id=3), SimpleNamespace(item_id=9, category_id=None)]
    a, fills_a = rt.candidates(objects, {}, 100)
    b, fills_b = rt.candidates(CandidateColumns([5, 9], {"category_id": [3, None]}), {}, 100)
    c, fills_c = rt.candidates(CandidateColumns([5, 9]), {}, 100)  # category_id left out by all
    assert torch.equal(a.item_id, b.item_id) and torch.equal(a.category_id, b.category_id)
    assert fills_a == fills_b == {("category_id", "unknown"): 1}
    assert c.category_id.tolist() == [[0, 0]] and fills_c == {("category_id", "unknown"): 2}

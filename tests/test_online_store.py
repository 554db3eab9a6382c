import threading
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from feature_store.online import EVENT_DTYPE, Event, OnlineStore, connect, stop_embedded, unpack_events


@pytest.fixture(params=["tcp", "embedded"], scope="module")
def backend(request, shared_redis_module):
    """(client, prefix factory): the shared Redis (db 15; keys deleted when the module ends) or
    an embedded one in the session's temp space (stopped when the module ends)."""
    if request.param == "tcp":
        yield shared_redis_module.client, shared_redis_module.prefix
        return
    c = connect(None)  # LONGER_REDIS_DIR: the session's own directory (tests/conftest.py)
    yield c, lambda: f"t{uuid.uuid4().hex[:8]}"
    stop_embedded(c)


@pytest.fixture
def store(backend):
    client, prefix = backend
    return OnlineStore(client, max_len=1000, prefix=prefix())


def test_append_is_idempotent_and_versions_increase(store):
    assert store.append([Event(1, 10, 100, event_id="a"), Event(1, 11, 101, event_id="b")]) == {1: 1}
    assert store.append([Event(1, 11, 101, event_id="b")]) == {1: 1}  # already applied: no bump
    assert store.append([Event(1, 12, 99), Event(2, 5, 50)]) == {1: 2, 2: 1}
    events, version, state = store.read(1, "m1")
    assert version == 2 and state is None
    assert events["item_id"].tolist() == [12, 10, 11]  # sorted by (ts, item_id)


def test_sequence_is_capped_at_max_len(backend):
    client, prefix = backend
    s = OnlineStore(client, max_len=3, prefix=prefix())
    s.append([Event(7, i, 1000 + i) for i in range(10)])
    assert s.read(7)[0]["item_id"].tolist() == [7, 8, 9]


def test_concurrent_writers_lose_nothing(store):
    users, writers, per_writer = [1, 2, 3], 32, 10
    seen_versions = {u: [] for u in users}
    lock = threading.Lock()

    def write(w):
        for i in range(per_writer):
            u = users[(w + i) % len(users)]
            v = store.append([Event(u, w * 1000 + i, 10_000 + w * per_writer + i, event_id=f"{w}-{i}")])[u]
            with lock:
                seen_versions[u].append(v)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = 0
    for u in users:
        events, version, _ = store.read(u)
        expected = sorted(w * 1000 + i for w in range(writers) for i in range(per_writer) if users[(w + i) % 3] == u)
        assert sorted(events["item_id"].tolist()) == expected
        assert sorted(seen_versions[u]) == list(range(1, len(expected) + 1))  # each append its own version
        assert version == len(expected)
        total += len(expected)
    assert total == writers * per_writer


def test_state_round_trip_ttl_and_size_cap(store):
    assert store.write_state(5, "mv", b"x" * 10)
    assert store.read(5, "mv")[2] == b"x" * 10
    assert 0 < store.r.ttl(store._key(5, "st:mv")) <= store.state_ttl_s
    assert store.read(5, "other")[2] is None
    store.state_max_bytes = 4
    assert not store.write_state(5, "mv2", b"y" * 5)


def test_garbage_in_redis_is_never_trusted(store):
    store.append([Event(9, 1, 10)])
    store.r.rpush(store._key(9, "seq"), b"short")
    store.r.set(store._key(9, "ver"), b"not a number")
    events, version, _ = store.read(9)
    assert events["item_id"].tolist() == [1] and version == -1
    assert len(unpack_events([b"\x00" * (EVENT_DTYPE.itemsize + 1)])) == 0


def test_bulk_load_matches_the_offline_sequences(backend, synth_dataset):
    client, prefix = backend
    s = OnlineStore(client, max_len=50, prefix=prefix())
    summary = s.load_sequences(synth_dataset, batch_users=7, progress=False)
    seq = pq.read_table(synth_dataset / "sequences").to_pydict()
    assert summary["users"] == len(seq["user_id"])
    for i in (0, 5, len(seq["user_id"]) - 1):
        events, version, _ = s.read(seq["user_id"][i])
        order = np.lexsort((seq["item_id"][i], seq["ts"][i]))[-50:]
        assert events["item_id"].tolist() == np.array(seq["item_id"][i])[order].tolist()
        assert events["action"].tolist() == np.array(seq["action"][i])[order].tolist()
        assert version == 1

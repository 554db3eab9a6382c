import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from feature_store.online import (
    EVENT_DTYPE,
    BadKeyError,
    Event,
    OnlineStore,
    connect,
    stop_embedded,
    unpack_events,
)
from feature_store.store_check import check_store
from tests.conftest import fresh_prefix
from tests.serving_utils import delete_prefix, shared_redis


@pytest.fixture(params=["tcp", "embedded"], scope="module")
def client(request):
    """The shared Redis (db 15), or an embedded one in the session's own directory
    (LONGER_REDIS_DIR, tests/conftest.py), stopped when the module ends."""
    if request.param == "tcp":
        yield shared_redis()
        return
    c = connect(None)
    yield c
    stop_embedded(c)


@pytest.fixture
def prefix(client):
    p = fresh_prefix()
    yield p
    delete_prefix(client, p)


@pytest.fixture
def store(client, prefix):
    return OnlineStore(client, max_len=1000, prefix=prefix)


def test_append_is_idempotent_and_versions_increase(store):
    done = store.append([Event(1, 10, 100, event_id="a"), Event(1, 11, 101, event_id="b")])
    assert done.seq_versions == {1: 1} and done.added == {1: 2}
    again = store.append([Event(1, 11, 101, event_id="b"), Event(1, 11, 101, event_id="b")])
    assert again.seq_versions == {1: 1} and again.total == 0  # already applied: no bump, nothing added
    done = store.append([Event(1, 12, 99), Event(2, 5, 50)])
    assert done.seq_versions == {1: 2, 2: 1} and done.added == {1: 1, 2: 1}
    events, version, state = store.read(1, "m1")
    assert version == 2 and state is None
    assert events["item_id"].tolist() == [12, 10, 11]  # sorted by (ts, item_id)


def test_sequence_is_capped_at_max_len(client, prefix):
    s = OnlineStore(client, max_len=3, prefix=prefix)
    s.append([Event(7, i, 1000 + i) for i in range(10)])
    assert s.read(7)[0]["item_id"].tolist() == [7, 8, 9]


def test_concurrent_writers_lose_nothing(store):
    users, writers, per_writer = [1, 2, 3], 32, 10
    seen_versions = {u: [] for u in users}
    lock = threading.Lock()

    def write(w):
        for i in range(per_writer):
            u = users[(w + i) % len(users)]
            v = store.append(
                [Event(u, w * 1000 + i, 10_000 + w * per_writer + i, event_id=f"{w}-{i}")]
            ).seq_versions[u]
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
        expected = sorted(
            w * 1000 + i for w in range(writers) for i in range(per_writer) if users[(w + i) % 3] == u
        )
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


def test_read_head_counts_the_events_without_reading_them(store):
    store.append([Event(6, 1, 10), Event(6, 2, 11)])
    store.write_state(6, "mv", b"s")
    events, version, blob = store.read(6, "mv")
    assert store.read_head(6, "mv") == (len(events), version, blob, 2) == (2, version, b"s", 2)
    assert store.read_head(6, "other") == (2, version, None, 2)
    assert store.read_head(404, "mv") == (0, 0, None, 0)  # no such user: an empty head
    store.r.rpush(store._key(6, "seq"), b"short")  # held, though `read` skips it
    assert store.read_head(6, "mv")[0] == 3 and len(store.read(6)[0]) == 2
    store.r.set(store._key(6, "st:mv"), b"x")
    store.r.delete(store._key(6, "seq"))
    store.r.sadd(store._key(6, "seq"), "1")
    with pytest.raises(BadKeyError, match=r"\{u6\}:seq holds a set, expected a list"):
        store.read_head(6, "mv")


def test_garbage_in_redis_is_never_trusted(store):
    store.append([Event(9, 1, 10)])
    store.r.rpush(store._key(9, "seq"), b"short")
    assert store.read(9)[0]["item_id"].tolist() == [1]  # a malformed item is skipped
    store.r.set(store._key(9, "ver"), b"not a number")
    with pytest.raises(BadKeyError, match=r"\{u9\}:ver is not a version counter"):
        store.read(9)
    with pytest.raises(BadKeyError, match=r"\{u9\}:ver is not a version counter"):
        store.append([Event(9, 2, 11)])
    store.r.delete(store._key(9, "ver"))
    store.r.sadd(store._key(9, "ver"), "1")
    with pytest.raises(BadKeyError, match=r"\{u9\}:ver holds a set, expected a string"):
        store.append([Event(9, 2, 11)])
    assert store.r.llen(store._key(9, "seq")) == 2  # a refused append changed nothing
    assert len(unpack_events([b"\x00" * (EVENT_DTYPE.itemsize + 1)])) == 0


def user_bytes(store, user: int) -> int:
    return sum(store.r.memory_usage(store._key(user, k)) or 0 for k in ("seq", "ver", "ids"))


def test_one_users_memory_is_bounded_by_the_idempotency_window(client, prefix):
    """ids of the last max_len events only: 3,000 (and 30,000) events with ids take about the
    memory of 300 — and an id inside the window is still deduplicated."""
    store = OnlineStore(client, max_len=256, prefix=prefix)
    sizes, n = {}, 0
    for target in (300, 3_000, 30_000):
        while n < target:
            store.append(
                [Event(5, n + i, 1_600_000_000 + n + i, event_id=f"evt-{n + i:08d}") for i in range(500)][
                    : target - n
                ]
            )
            n = min(target, n + 500)
        sizes[target] = user_bytes(store, 5)
    print({"user_key_bytes": sizes})
    assert sizes[3_000] <= 1.5 * sizes[300] and sizes[30_000] <= 1.5 * sizes[300]
    assert store.r.zcard(store._key(5, "ids")) == 256 and store.r.llen(store._key(5, "seq")) == 256
    assert store.append([Event(5, 1, 1, event_id="evt-00029999")]).total == 0  # inside the window
    assert store.append([Event(5, 1, 1, event_id="evt-00000000")]).total == 1  # long gone: appended again


def test_a_legacy_set_of_ids_is_replaced_by_the_window(store):
    store.r.sadd(store._key(3, "ids"), "old-1", "old-2")
    assert store.append([Event(3, 1, 10, event_id="new")]).total == 1
    assert store.r.type(store._key(3, "ids")) in (b"zset", "zset")


def test_store_check_finds_bad_keys_and_repair_keeps_valid_events(client, store):
    from longer_cli.main import main

    good = [Event(u, i, 100 + i) for u in (1, 2, 3, 4) for i in range(3)]
    store.append(good)
    store.write_state(3, "mv", b"cached")
    store.r.rpush(store._key(1, "seq"), b"short", b"x" * 40)  # malformed items among valid ones
    store.r.set(store._key(2, "ver"), "abc")  # unreadable counter
    store.r.delete(store._key(3, "ids"))
    store.r.set(store._key(3, "ids"), "wrong type")
    store.r.delete(store._key(4, "seq"))
    store.r.hset(store._key(4, "seq"), "a", "b")  # wrong type: no readable event
    store.r.rpush(store._key(5, "st:mv"), "x")
    store.r.set(f"{store.prefix}:{{uabc}}:seq", "x")  # not a key of the key map
    store.r.set(store._key(6, "tot"), "many")  # unreadable event total
    report = check_store(client, store.prefix)
    assert not report["ok"] and report["users_with_problems"] == 6
    assert "not an event total" in {p["key"]: p for p in report["problems"]}[store._key(6, "tot")]["problem"]
    bad = {p["key"]: p for p in report["problems"]}
    assert "2 of 5 items are not 33-byte packed events" in bad[store._key(1, "seq")]["problem"]
    assert "not a version counter" in bad[store._key(2, "ver")]["problem"]
    assert "holds a string, expected a zset" in bad[store._key(3, "ids")]["problem"]
    assert "holds a hash, expected a list" in bad[store._key(4, "seq")]["problem"]
    assert "holds a list, expected a string" in bad[store._key(5, "st:mv")]["problem"]
    assert bad[f"{store.prefix}:{{uabc}}:seq"]["repair"] == "left alone"
    url = client.connection_pool.connection_kwargs
    if "path" in url:  # the embedded server: check the in-process API only
        fixed = check_store(client, store.prefix, repair=True)
    else:
        argv = [
            "store",
            "check",
            "--redis",
            f"redis://{url['host']}:{url['port']}/{url['db']}",
            "--prefix",
            store.prefix,
            "--quiet",
        ]
        assert main(argv) == 1  # problems found, not repaired
        assert main([*argv, "--repair"]) == 0
        fixed = {"ok": True}
    assert fixed["ok"]
    after = check_store(client, store.prefix)
    assert [p["key"] for p in after["problems"]] == [f"{store.prefix}:{{uabc}}:seq"]
    for user in (1, 2, 3):  # every valid event kept
        assert store.read(user)[0]["item_id"].tolist() == [0, 1, 2]
    assert store.read(1)[1] == 2 and store.read(2)[1] > 10**12  # versions moved forward
    assert store.read(4)[0].size == 0
    for user in (1, 2, 3, 4):
        assert store.append([Event(user, 9, 200, event_id="after")]).total == 1
    client.delete(f"{store.prefix}:{{uabc}}:seq")


def test_bulk_load_matches_the_offline_sequences(client, prefix, synth_dataset):
    s = OnlineStore(client, max_len=50, prefix=prefix)
    summary = s.load_sequences(synth_dataset, batch_users=7, progress=False)
    seq = pq.read_table(synth_dataset / "sequences").to_pydict()
    assert summary["users"] == len(seq["user_id"])
    for i in (0, 5, len(seq["user_id"]) - 1):
        events, version, _ = s.read(seq["user_id"][i])
        order = np.lexsort((seq["item_id"][i], seq["ts"][i]))[-50:]
        assert events["item_id"].tolist() == np.array(seq["item_id"][i])[order].tolist()
        assert events["action"].tolist() == np.array(seq["action"][i])[order].tolist()
        assert version == 1


def test_tot_counts_every_event_ever_appended(client, prefix):
    s = OnlineStore(client, max_len=3, prefix=prefix)
    s.append([Event(7, i, 1000 + i, event_id=str(i)) for i in range(5)])
    s.append([Event(7, 4, 1004, event_id="4"), Event(7, 5, 1005)])  # a repeat adds nothing
    assert s.read_head(7, "mv")[::3] == (3, 6)  # 3 held, 6 ever appended
    assert int(s.r.get(s._key(7, "tot"))) == 6
    s.set_totals({7: 100})
    s.append([Event(7, 6, 1006)])
    assert s.read_head(7, "mv")[3] == 101


def test_a_store_without_tot_counts_on_from_the_list_length(store):
    store.append([Event(3, 1, 10), Event(3, 2, 11)])
    store.r.delete(store._key(3, "tot"))  # a store loaded before issue 17
    assert store.read_head(3, "mv")[3] == 2 and store.read_since(3, 0, "mv").total == 2
    store.append([Event(3, 3, 12)])
    assert int(store.r.get(store._key(3, "tot"))) == 3


def test_read_since_reads_only_the_new_events(client, prefix):
    s = OnlineStore(client, max_len=4, prefix=prefix)
    s.append([Event(8, i, 100 + i) for i in range(3)])
    s.write_state(8, "mv", b"state")
    head = s.read_since(8, 1, "mv")
    assert (head.seq_version, head.total, head.held, head.blob, head.complete) == (1, 3, 3, b"state", True)
    assert head.events["item_id"].tolist() == [1, 2]
    assert s.read_since(8, 3, "mv").events.size == 0 and s.read_since(8, 3, "mv").complete
    s.append([Event(8, i, 100 + i) for i in range(3, 6)])  # 6 appended, the list keeps 4
    tail = s.read_since(8, 3, "mv")
    assert tail.complete and tail.events["item_id"].tolist() == [3, 4, 5] and tail.blob == b"state"
    for since in (None, 1, 7):  # none asked, trimmed away, above the total: the whole list
        whole = s.read_since(8, since, "other")
        assert not whole.complete and whole.events["item_id"].tolist() == [2, 3, 4, 5]
        assert whole.blob is None and (whole.total, whole.held) == (6, 4)
    empty = s.read_since(404, 0, "mv")
    assert (empty.seq_version, empty.total, empty.held, empty.complete, empty.events.size) == (
        0,
        0,
        0,
        True,
        0,
    )


def test_read_since_names_an_unusable_key(store):
    store.append([Event(9, 1, 10)])
    store.r.set(store._key(9, "st:mv"), b"x")
    store.r.delete(store._key(9, "st:mv"))
    store.r.sadd(store._key(9, "st:mv"), "1")  # a state of the wrong type reads as none
    assert store.read_since(9, 0, "mv").blob is None
    store.r.set(store._key(9, "tot"), b"many")
    for read in (lambda: store.read_since(9, 0, "mv"), lambda: store.read_head(9, "mv")):
        with pytest.raises(BadKeyError, match=r"\{u9\}:tot is not an event total"):
            read()
    with pytest.raises(BadKeyError, match=r"\{u9\}:tot is not an event total"):
        store.append([Event(9, 2, 11)])
    store.r.delete(store._key(9, "tot"))
    store.r.delete(store._key(9, "seq"))
    store.r.sadd(store._key(9, "seq"), "1")
    with pytest.raises(BadKeyError, match=r"\{u9\}:seq holds a set, expected a list"):
        store.read_since(9, 0, "mv")

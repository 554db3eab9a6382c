"""The online store's feature tables (issue 15): the event layout derived from the spec (the
default's is today's 33 bytes), the meta record and its check, profiles (read, upsert with
invalidation, bad keys), the item table, and `store check` on a store of another layout."""

import dataclasses

import pytest

from feature_store.online import (
    EVENT_DTYPE,
    BadKeyError,
    Event,
    LayoutError,
    OnlineStore,
    event_dtype,
)
from feature_store.store_check import check_store
from longer.spec import FeatureSpec
from tests.serving_utils import prefixed_store, shared_redis

SPEC = dataclasses.replace(
    FeatureSpec(
        sequence=("category_id", "slot", "tags"), candidate=("shop", "genres"), user=("tier", "likes")
    ),
    lists=("tags", "genres", "likes"),
)


@pytest.fixture
def store():
    with prefixed_store(shared_redis(), max_len=100, layout=event_dtype(SPEC)) as s:
        yield s


def test_the_default_spec_keeps_the_stored_layout():
    assert event_dtype(FeatureSpec()) == EVENT_DTYPE and EVENT_DTYPE.itemsize == 33
    assert event_dtype(SPEC).names == ("ts", "item_id", "category_id", "slot", "label")  # no list column


def test_events_carry_the_specs_sequence_columns_and_the_layout_is_checked(store):
    with pytest.raises(LayoutError, match=f"no {store.meta_key}"):
        store.check_layout()  # no record: the default layout, not this one
    store.write_meta()
    store.append([Event(1, item_id=5, ts=10, category_id=2, columns={"slot": 3}), Event(1, item_id=6, ts=11)])
    events, version, _ = store.read(1)
    assert events["slot"].tolist() == [3, 0] and events["category_id"].tolist() == [2, 0] and version == 1
    default = OnlineStore(store.r, max_len=100, prefix=store.prefix)
    with pytest.raises(LayoutError, match="slot"):
        default.check_layout()
    assert check_store(store.r, store.prefix)["problems"] == []  # 41-byte events are this store's


def test_profiles_upsert_invalidates_and_bad_keys_are_named(store):
    store.write_rows([store.profile_key(1)], [{"tier": 2, "likes": [4, 5]}])
    assert store.read_profile(1, SPEC) == {}  # the meta record holds no profile column yet: no read
    store.write_meta(user=("tier", "likes"))
    assert store.read_profile(1, SPEC) == {"tier": 2, "likes": [4, 5]}
    state = store._key(1, "st:m1")
    store.r.set(state, b"x")
    version = store.read(1)[1]
    assert store.put_profile(1, {"tier": 3}, "m1") == version + 1
    assert store.read_profile(1, SPEC) == {"tier": 3, "likes": [4, 5]} and store.r.get(state) is None
    store.r.hset(store.profile_key(1), "tier", "garbage")
    assert store.read_profile(1, SPEC) == {"likes": [4, 5]}  # unreadable: the unknown bucket
    store.r.delete(store.profile_key(2))
    store.r.rpush(store.profile_key(2), b"x")
    with pytest.raises(BadKeyError, match=r"prof holds a list"):
        store.put_profile(2, {"tier": 1}, "m1")
    with pytest.raises(BadKeyError, match=r"prof holds a list"):
        store.read_profile(2, SPEC)
    problems = check_store(store.r, store.prefix)["problems"]
    assert [p["key"] for p in problems] == [store.profile_key(2)]


def test_the_item_table(store):
    store.write_rows([store.item_key(7), store.item_key(8)], [{"shop": 3, "genres": [1, 2]}, {"shop": 4}])
    store.r.rpush(store.item_key(9), b"x")
    rows = store.read_items([7, 8, 9, 10, 7], ["shop", "genres"], SPEC)
    assert rows == {7: {"shop": 3, "genres": [1, 2]}, 8: {"shop": 4}, 10: {}}


def test_an_unreadable_meta_record_is_named(store):
    store.r.rpush(store.meta_key, b"x")
    with pytest.raises(LayoutError, match=f"{store.meta_key} holds a list"):
        store.check_layout()
    store.r.delete(store.meta_key)
    store.r.set(store.meta_key, "{not json")
    with pytest.raises(LayoutError, match=f"{store.meta_key}: not a store meta record"):
        store.check_layout()

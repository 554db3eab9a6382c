"""The online store's feature tables (issue 15): the event layout derived from the spec (the
default's is today's 33 bytes; a list sequence column a fixed-width subarray padded with -1, its
width the store's), the meta record and its check (widths included), profiles (read, upsert with
invalidation, bad keys), the item table, and `store check` on a store of another layout."""

import dataclasses
import json

import pytest

from feature_store.online import (
    EVENT_DTYPE,
    BadKeyError,
    Event,
    LayoutError,
    OnlineStore,
    StoreMeta,
    event_dtype,
    event_lists,
    layout_text,
    pack_events,
    unpack_events,
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
    with prefixed_store(shared_redis(), max_len=100, layout=event_dtype(SPEC, {"tags": 3})) as s:
        yield s


def test_the_default_spec_keeps_the_stored_layout():
    assert event_dtype(FeatureSpec()) == EVENT_DTYPE and EVENT_DTYPE.itemsize == 33
    layout = event_dtype(SPEC, {"tags": 3})
    assert layout.names == ("ts", "item_id", "category_id", "slot", "tags", "label")
    assert layout["tags"].shape == (3,) and layout.itemsize == 4 * 8 + 3 * 8 + 1
    assert layout_text(layout) == "(ts, item_id, category_id, slot, tags[3], label; 57 bytes)"
    with pytest.raises(LayoutError, match="'tags' has no width"):
        event_dtype(SPEC)


def test_list_columns_pack_with_minus_one_padding_and_zero_stays_an_id():
    layout = event_dtype(SPEC, {"tags": 3})
    events = [
        Event(1, item_id=5, ts=10, columns={"tags": [0, 7]}),  # 0 is a real id, as offline
        Event(1, item_id=6, ts=11, columns={"tags": []}),
        Event(1, item_id=7, ts=12),  # left out: the empty list (not W zeros)
        Event(1, item_id=8, ts=13, columns={"tags": [3, 0, 3]}),  # exactly W
    ]
    arr = unpack_events(pack_events(events, layout), layout)
    assert arr["tags"].tolist() == [[0, 7, -1], [-1, -1, -1], [-1, -1, -1], [3, 0, 3]]
    ids, lengths = event_lists(arr, "tags")
    assert ids.tolist() == [0, 7, 3, 0, 3] and lengths.tolist() == [2, 0, 0, 3]
    with pytest.raises(ValueError, match="'tags': 4 ids, the layout holds 3"):
        pack_events([Event(1, item_id=9, ts=14, columns={"tags": [1, 2, 3, 4]})], layout)
    empty = event_dtype(SPEC, {"tags": 0})  # every list of the data empty: W = 0
    ids, lengths = event_lists(unpack_events(pack_events(events[1:3], empty), empty), "tags")
    assert ids.tolist() == [] and lengths.tolist() == [0, 0]


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
    assert check_store(store.r, store.prefix)["problems"] == []  # 57-byte events are this store's
    assert json.loads(store.r.get(store.meta_key))["widths"] == {"tags": 3}


def test_a_spec_store_takes_its_list_widths_from_the_meta_record(store):
    """The service's store (`spec=`) learns W from `meta` on its first use; a store of other
    widths (once bound), of a scalar where the spec has a list, or with no width is refused."""
    store.write_meta()
    store.append([Event(2, item_id=5, ts=10, columns={"slot": 1, "tags": [4, 0]})])
    served = OnlineStore(store.r, max_len=100, prefix=store.prefix, spec=SPEC)
    assert served.layout_text() == "(ts, item_id, category_id, slot, tags[W], label)"
    events, _, _ = served.read(2)  # the first use reads the widths
    assert served.layout == store.layout and event_lists(events, "tags")[0].tolist() == [4, 0]
    wider = OnlineStore(store.r, max_len=100, prefix=store.prefix, layout=event_dtype(SPEC, {"tags": 5}))
    wider.write_meta()  # the store reloaded with W = 5 while `served` runs
    with pytest.raises(LayoutError, match=r"tags\[5\].*tags\[3\].*list widths changed"):
        served.check_layout()
    for fields, widths in (
        (("ts", "item_id", "category_id", "slot", "tags", "label"), {}),  # tags a scalar
        (("ts", "item_id", "category_id", "slot", "label"), {}),  # no tags at all
    ):
        store.r.set(store.meta_key, StoreMeta(fields, widths=widths).to_json())
        fresh = OnlineStore(store.r, max_len=100, prefix=store.prefix, spec=SPEC)
        with pytest.raises(LayoutError, match=r"tags\[W\]"):
            fresh.check_layout()
        with pytest.raises(LayoutError):
            fresh.read(2)  # no layout, no misread events
    fresh.check_spec(SPEC)  # same columns: a hot reload may keep the store
    with pytest.raises(LayoutError, match=r"packs events as \(ts, item_id, category_id, slot, tags, label\)"):
        fresh.check_spec(dataclasses.replace(SPEC, lists=()))  # tags a scalar in the new bundle


@pytest.mark.parametrize(
    "widths, problem",
    [
        ({"tags": -1}, "not an integer"),
        ({"tags": "3"}, "not an integer"),
        ({"shop": 2}, "not a sequence column"),
    ],
)
def test_a_meta_record_with_bad_widths_is_refused(store, widths, problem):
    fields = ("ts", "item_id", "category_id", "slot", "tags", "label")
    raw = json.dumps({"event_fields": fields, "user": [], "candidate": [], "widths": widths})
    with pytest.raises(LayoutError, match=problem):
        StoreMeta.from_json(store.meta_key, raw)
    assert (
        StoreMeta.from_json(store.meta_key, raw.replace(', "widths": ' + json.dumps(widths), "")).widths == {}
    )


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

"""The declared feature spec (longer/spec.py): validation, derived keys, resolve, round trip."""

import pytest

from longer.spec import FeatureSpec, SpecError, default_buckets, next_prime


def test_default_spec_is_todays_keys():
    # the keys and tables of the model, loader and batch before the spec (literal on purpose)
    s = FeatureSpec()
    assert s.sparse_keys == (
        "hist_item_id",
        "hist_category_id",
        "hist_action",
        "item_id",
        "category_id",
        "user_id",
    )
    assert s.history_keys == ("hist_item_id", "hist_category_id", "hist_action")
    assert s.candidate_keys == ("item_id", "category_id")
    assert s.tables() == {
        "item": ("hist_item_id", "item_id"),
        "category": ("hist_category_id", "category_id"),
        "action": ("hist_action",),
        "user": ("user_id",),
    }
    assert FeatureSpec.from_config(None) == FeatureSpec.from_config({}) == s


def test_derived_keys_of_every_kind():
    s = FeatureSpec.from_config(
        {
            "sequence": ["category_id", "action", "genres"],
            "candidate": ["category_id", "genres", "year"],
            "user": ["age_bucket"],
            "context": ["device"],
            "dense": ["price"],
        }
    )
    assert s.history_keys == ("hist_item_id", "hist_category_id", "hist_action", "hist_genres")
    assert s.candidate_keys == ("item_id", "category_id", "genres", "year")
    assert s.user_keys == ("user_id", "age_bucket")
    assert s.context_keys == ("device",) and s.dense_keys == ("price",)
    assert s.sparse_keys == s.history_keys + s.candidate_keys + s.user_keys + s.context_keys
    assert s.tables()["genres"] == ("hist_genres", "genres")  # shared table
    assert s.tables()["year"] == ("year",)
    assert s.categorical == ("category_id", "action", "genres", "year", "age_bucket", "device")


@pytest.mark.parametrize(
    "table, words",
    [
        ({"sequnce": []}, ["unknown key 'sequnce'"]),
        ({"user": "age"}, ["user", "list of column names"]),
        ({"sequence": ["item_id"]}, ["sequence", "'item_id' is always"]),
        ({"context": ["ts"]}, ["context", "'ts'", "reserved"]),
        ({"candidate": ["a", "a"]}, ["candidate", "'a' listed twice"]),
        ({"user": ["category_id"]}, ["user", "'category_id'", "also in sequence"]),
        ({"user": ["x"], "dense": ["x"]}, ["dense", "'x'", "also in user"]),
        ({"buckets": {"nope": 10}}, ["[features.buckets] nope", "not a declared"]),
        ({"buckets": {"category_id": 1}}, ["[features.buckets] category_id", ">= 2"]),
        ({"buckets": [1]}, ["buckets", "table"]),
    ],
)
def test_bad_tables_name_the_key(table, words):
    with pytest.raises(SpecError) as e:
        FeatureSpec.from_config(table)
    for w in words:
        assert w in str(e.value)


META = {
    "cardinalities": {
        "user_id": {"max_id": 99, "distinct": 100},
        "item_id": {"max_id": 999, "distinct": 1000},
        "category_id": {"max_id": 19, "distinct": 20},
        "action": {"max_id": 3, "distinct": 3},
        "genres": {"max_id": 19, "distinct": 19},
        "zip": {"max_id": 2**40, "distinct": 50},
    },
    "features": {
        "kinds": {"category_id": "int", "action": "int", "genres": "list", "zip": "int", "price": "float"},
        "dense_stats": {"price": {"mean": 3.5, "std": 2.0}},
    },
}


def test_resolve_fills_buckets_lists_and_stats():
    s = FeatureSpec.from_config(
        {
            "candidate": ["category_id", "genres"],
            "user": ["zip"],
            "dense": ["price"],
            "buckets": {"genres": 64},
        }
    ).resolve(META, model_buckets={"item_id": 2003, "category_id": 32})
    assert s.buckets == {"genres": 64, "category_id": 32, "zip": next_prime(100)}
    assert s.lists == ("genres",) and s.is_list("genres") and not s.is_list("zip")
    assert s.dense_stats == {"price": (3.5, 2.0)}
    # the model-sized columns keep ModelConfig's size: the default spec resolves to no new buckets
    assert FeatureSpec().resolve(META).buckets == {}


def test_resolve_names_a_missing_column():
    with pytest.raises(SpecError, match="column 'brand'"):
        FeatureSpec.from_config({"candidate": ["brand"]}).resolve(META)
    with pytest.raises(SpecError, match="column 'dwell'"):
        FeatureSpec.from_config({"dense": ["dwell"]}).resolve(META)


def test_default_buckets_rule():
    assert default_buckets(19, 20) == 21  # small ids: their own rows, plus one
    assert default_buckets(2**40, 50) == 101  # hashed ids: next prime >= 2 x distinct
    assert next_prime(100) == 101 and next_prime(2) == 2


def test_check_names_missing_and_mistyped_columns():
    s = FeatureSpec.from_config({"user": ["age"], "dense": ["price"]})
    kinds = {"category_id": "int", "action": "int", "age": "int", "price": "float"}
    s.check(kinds)
    s.check(kinds | {"age": "list"})
    with pytest.raises(SpecError, match=r"column 'age': declared in \[features\] user but not in the log"):
        s.check({k: v for k, v in kinds.items() if k != "age"})
    with pytest.raises(SpecError, match="column 'age'.*integer column or a list<int64>.*float"):
        s.check(kinds | {"age": "float"})
    with pytest.raises(SpecError, match="column 'price'.*float column, the log has a list"):
        s.check(kinds | {"price": "list"})


def test_json_round_trip():
    s = FeatureSpec.from_config(
        {"candidate": ["category_id", "genres"], "user": ["zip"], "dense": ["price"]}
    ).resolve(META)
    assert FeatureSpec.from_json(s.to_json()) == s
    import json

    assert FeatureSpec.from_json(json.dumps(s.to_json())) == s


DEFAULT_CARDS = {c: {"max_id": 5, "distinct": 5} for c in ("category_id", "action")}


def test_resolving_a_bundles_spec_keeps_its_training_statistics():
    meta = {
        "cardinalities": {"brand": {"max_id": 9, "distinct": 9}, **DEFAULT_CARDS},
        "features": {"kinds": {"brand": "int"}, "dense_stats": {"price": {"mean": 5.0, "std": 2.0}}},
    }
    spec = FeatureSpec.from_config({"candidate": ["brand"], "dense": ["price"]}).resolve(meta)
    other = {
        "cardinalities": {"brand": {"max_id": 99, "distinct": 99}, **DEFAULT_CARDS},
        "features": {"kinds": {"brand": "int"}, "dense_stats": {"price": {"mean": 7.0, "std": 1.0}}},
    }
    again = spec.resolve(other)
    assert (
        again.dense_stats == {"price": (5.0, 2.0)} and again.buckets["brand"] == spec.buckets["brand"] == 11
    )

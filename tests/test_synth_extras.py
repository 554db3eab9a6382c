"""`longer synth --extra-columns` (issue 15): one column of every feature kind, the default
log unchanged, and a build that declares them all."""

import numpy as np
import pyarrow.parquet as pq

from feature_store.builder import BuildConfig, build
from feature_store.schema import read_log, scan_log
from feature_store.synth import SynthConfig, synthesize
from longer.spec import FeatureSpec

CFG = dict(users=30, items=200, events_per_user=40, seed=3, days=10)


def test_extra_columns_leave_the_default_log_unchanged(tmp_path):
    plain = read_log(synthesize(SynthConfig(**CFG), tmp_path / "a", progress=False)["out"])
    rich = read_log(synthesize(SynthConfig(**CFG, extra_columns=True), tmp_path / "b", progress=False)["out"])
    assert rich.select(plain.column_names).equals(plain)
    schema, _, _ = scan_log(tmp_path / "b")
    assert {c: schema.kinds[c] for c in ("tier", "brand", "device", "price", "tags")} == {
        "tier": "int",
        "brand": "int",
        "device": "int",
        "price": "float",
        "tags": "list",
    }


def test_extra_columns_follow_their_kinds(tmp_path):
    t = read_log(synthesize(SynthConfig(**CFG, extra_columns=True), tmp_path / "log", progress=False)["out"])
    d = t.to_pydict()
    by_item: dict = {}
    for i, b, p, g in zip(d["item_id"], d["brand"], d["price"], d["tags"]):
        assert 1 <= len(g) <= 3
        assert by_item.setdefault(i, (b, p, g)) == (b, p, g)  # item columns are fixed per item
    assert set(d["device"]) == {1, 2, 3}
    for u in set(d["user_id"]):  # tier: 1 then 2, changing once, in time order
        rows = sorted((ts, tier) for uu, ts, tier in zip(d["user_id"], d["ts"], d["tier"]) if uu == u)
        tiers = [tier for _, tier in rows]
        assert tiers[0] == 1 and tiers[-1] == 2 and np.all(np.diff(tiers) >= 0)


def test_build_declares_every_kind(tmp_path):
    synthesize(SynthConfig(**CFG, extra_columns=True), tmp_path / "log", progress=False)
    spec = FeatureSpec.from_config(
        {
            "sequence": ["category_id", "action", "tags"],
            "candidate": ["category_id", "brand", "tags"],
            "user": ["tier"],
            "context": ["device"],
            "dense": ["price"],
        }
    )
    meta = build(
        tmp_path / "log", tmp_path / "data", BuildConfig(max_len=16, test_days=2), progress=False, spec=spec
    )
    resolved = spec.resolve(meta)
    assert resolved.lists == ("tags",) and set(resolved.dense_stats) == {"price"}
    assert pq.read_table(tmp_path / "data" / "users").column_names == ["user_id", "tier"]

"""`longer build` with a declared feature spec (issue 15): carried columns, column checks,
point-in-time user columns, users/ and items/ tables, meta cardinalities and dense stats."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.builder import BuildConfig, build
from feature_store.schema import LogError
from longer.spec import FeatureSpec
from longer_cli.main import main
from tests.conftest import random_log, write_log

SPLIT = 1_600_000_030


def read_dir(path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(path.glob("part-*.parquet"))])


def rich_log(rng, rows=2000) -> dict:
    """random_log plus a user profile column that changes mid-life, an item column, a
    context column, a dense column and a list column."""
    log = random_log(rng, rows=rows)
    log["tier"] = np.where(log["ts"] >= 1_600_000_020, 2, 1) * 10 + log["user_id"] % 3
    log["brand"] = log["item_id"] % 5 + 100 * (log["ts"] >= 1_600_000_035)  # re-branded late
    log["device"] = rng.integers(0, 3, rows).astype(np.int64)
    log["price"] = rng.random(rows) * 10
    tags = [list(rng.integers(0, 50, int(n))) for n in rng.integers(0, 4, rows)]
    log["tags"] = pa.array(tags, pa.list_(pa.int64()))
    return log


SPEC = FeatureSpec.from_config(
    {
        "sequence": ["category_id", "action", "tags"],
        "candidate": ["category_id", "brand", "tags"],
        "user": ["tier"],
        "context": ["device"],
        "dense": ["price"],
    }
)


def build_rich(tmp_path, spec=SPEC, bucket_rows=300, seed=0):
    log = rich_log(np.random.default_rng(seed))
    write_log(tmp_path / "log" / "part-0.parquet", log)
    cfg = BuildConfig(max_len=8, split_ts=SPLIT, bucket_rows=bucket_rows)
    return log, build(tmp_path / "log", tmp_path / "data", cfg, progress=False, spec=spec)


def test_default_build_carries_todays_columns(tmp_path):
    write_log(tmp_path / "log.parquet", random_log(np.random.default_rng(0)))
    meta = build(
        tmp_path / "log.parquet", tmp_path / "data", BuildConfig(max_len=8, split_ts=SPLIT), progress=False
    )
    assert meta["schema_version"] == 2
    assert meta["columns"]["sequence"] == ["item_id", "ts", "category_id", "action", "label"]
    assert read_dir(tmp_path / "data" / "sequences").column_names == ["user_id", *meta["columns"]["sequence"]]
    assert read_dir(tmp_path / "data" / "users").column_names == ["user_id"]
    assert read_dir(tmp_path / "data" / "items").column_names == ["item_id", "category_id"]
    assert FeatureSpec.from_json(meta["features"]["spec"]) == FeatureSpec()


def test_default_build_of_a_log_without_category_still_works(tmp_path):
    log = random_log(np.random.default_rng(0))
    del log["category_id"]
    write_log(tmp_path / "log.parquet", log)
    meta = build(
        tmp_path / "log.parquet", tmp_path / "data", BuildConfig(max_len=8, split_ts=SPLIT), progress=False
    )
    assert meta["columns"]["sequence"] == ["item_id", "ts", "action", "label"]


def test_sequences_carry_declared_columns_including_lists(tmp_path):
    log, meta = build_rich(tmp_path)
    assert meta["columns"]["sequence"] == ["item_id", "ts", "category_id", "action", "tags", "label"]
    seq = read_dir(tmp_path / "data" / "sequences")
    assert seq.schema.field("tags").type == pa.list_(pa.list_(pa.int64()))
    rows = list(
        zip(log["user_id"].tolist(), log["ts"].tolist(), log["item_id"].tolist(), log["tags"].to_pylist())
    )
    d = seq.to_pydict()
    for u, ts, items, tags in zip(d["user_id"], d["ts"], d["item_id"], d["tags"]):
        # the user's events in (ts, item_id) order carry their own tags (ties: same multiset)
        want = sorted((t, i, sorted(g)) for uu, t, i, g in rows if uu == u)
        assert sorted((t, i, sorted(g)) for t, i, g in zip(ts, items, tags)) == want
        assert ts == sorted(ts)


def test_meta_cardinalities_kinds_and_train_dense_stats(tmp_path):
    log, meta = build_rich(tmp_path)
    cards = meta["cardinalities"]
    flat = np.concatenate([np.asarray(x, np.int64) for x in log["tags"].to_pylist()])
    assert cards["tags"] == {"max_id": int(flat.max()), "distinct": len(np.unique(flat))}
    for c in ("item_id", "category_id", "brand", "tier", "device"):
        assert cards[c] == {"max_id": int(log[c].max()), "distinct": len(np.unique(log[c]))}, c
    assert cards["user_id"]["distinct"] == len(np.unique(log["user_id"]))
    assert meta["features"]["kinds"]["tags"] == "list" and meta["features"]["kinds"]["price"] == "float"
    train = log["price"][log["ts"] < SPLIT]
    stats = meta["features"]["dense_stats"]["price"]
    assert stats["mean"] == pytest.approx(train.mean()) and stats["std"] == pytest.approx(train.std())
    assert json.loads((tmp_path / "data" / "meta.json").read_text()) == json.loads(json.dumps(meta))
    spec = SPEC.resolve(meta)
    assert spec.lists == ("tags",) and spec.dense_stats["price"] == (stats["mean"], stats["std"])
    assert spec.buckets["tier"] == cards["tier"]["max_id"] + 2


@pytest.mark.parametrize("bucket_rows", [10**9, 300])
def test_user_columns_point_in_time_and_users_table(tmp_path, bucket_rows):
    """tier changes for every user at ts 1_600_000_020: samples before keep the old value,
    samples from then on have the new one; users/ holds each user's latest value."""
    log, _ = build_rich(tmp_path, bucket_rows=bucket_rows)
    for split in ("train", "eval"):
        t = read_dir(tmp_path / "data" / split).to_pydict()
        for u, ts, tier in zip(t["user_id"], t["ts"], t["tier"]):
            assert tier == (2 if ts >= 1_600_000_020 else 1) * 10 + u % 3
    users = read_dir(tmp_path / "data" / "users").to_pydict()
    assert list(users) == ["user_id", "tier"]
    assert sorted(users["user_id"]) == sorted(set(log["user_id"].tolist()))
    for u, tier in zip(users["user_id"], users["tier"]):
        last_ts = log["ts"][log["user_id"] == u].max()
        assert tier == (2 if last_ts >= 1_600_000_020 else 1) * 10 + u % 3


@pytest.mark.parametrize("bucket_rows", [10**9, 97])
def test_items_table_holds_latest_candidate_columns(tmp_path, bucket_rows):
    log, _ = build_rich(tmp_path, bucket_rows=bucket_rows)
    items = pq.read_table(tmp_path / "data" / "items" / "part-00000.parquet").to_pydict()
    assert list(items) == ["item_id", "category_id", "brand", "tags"]
    assert items["item_id"] == sorted(set(log["item_id"].tolist()))
    for i, brand in zip(items["item_id"], items["brand"]):
        last_ts = log["ts"][log["item_id"] == i].max()
        assert brand == i % 5 + 100 * (last_ts >= 1_600_000_035)


@pytest.mark.parametrize(
    "table, column, fragment",
    [
        ({"user": ["age"]}, "age", "declared in [features] user but not in the log"),
        (
            {"user": ["price"]},
            "price",
            "needs an integer column or a list<int64> column, the log has a float",
        ),
        ({"dense": ["device"]}, "device", "needs a float column, the log has an integer"),
        ({"context": ["note"]}, "note", "not in the log"),  # a string column is not a feature
    ],
)
def test_declared_columns_are_checked_in_one_line(tmp_path, table, column, fragment):
    log = rich_log(np.random.default_rng(0))
    log["note"] = ["x"] * len(log["ts"])
    path = write_log(tmp_path / "log" / "part-0.parquet", log)
    with pytest.raises(LogError) as e:
        build(
            path.parent,
            tmp_path / "data",
            BuildConfig(max_len=8, split_ts=SPLIT),
            progress=False,
            spec=FeatureSpec.from_config(table),
        )
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"column '{column}'" in msg and fragment in msg, msg
    assert not (tmp_path / "data").exists()


def test_cli_build_reads_features_from_config(tmp_path, capsys):
    write_log(tmp_path / "log.parquet", rich_log(np.random.default_rng(0)))
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\nmax_len = 8\n\n[features]\nuser = ["tier"]\ndense = ["price"]\n')
    args = [
        "build",
        "--log",
        str(tmp_path / "log.parquet"),
        "--max-len",
        "8",
        "--split-ts",
        str(SPLIT),
        "--quiet",
    ]
    assert main([*args, "--out", str(tmp_path / "d1"), "--config", str(cfg)]) == 0
    assert read_dir(tmp_path / "d1" / "users").column_names == ["user_id", "tier"]
    cfg.write_text('[features]\nuser = ["tier", "gender"]\n')
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "d2"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "column 'gender'" in err and "log.parquet" in err, err
    cfg.write_text('[features]\nusr = ["tier"]\n')
    assert main([*args, "--out", str(tmp_path / "d3"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(cfg) in err and "unknown key 'usr'" in err, err


def test_cli_build_config_unreadable(tmp_path, capsys):
    write_log(tmp_path / "log.parquet", random_log(np.random.default_rng(0)))
    args = [
        "build",
        "--log",
        str(tmp_path / "log.parquet"),
        "--max-len",
        "8",
        "--quiet",
        "--out",
        str(tmp_path / "d"),
    ]
    assert main([*args, "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[features\n")
    assert main([*args, "--config", str(tmp_path / "bad.toml")]) == 2
    assert "bad.toml" in capsys.readouterr().err

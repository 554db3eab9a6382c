import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.builder import BuildConfig, build, point_in_time_hist_len
from feature_store.io import OutputExistsError
from feature_store.schema import LogError
from tests.conftest import random_log, write_log

SORT = ("ts", "item_id", "label", "category_id", "action")


def reference(log: dict) -> dict:
    """Brute force: per user, events sorted by (ts, item, label, category, action)."""
    rows = [dict(zip(log, vals)) for vals in zip(*log.values())]
    by_user = {}
    for r in rows:
        by_user.setdefault(int(r["user_id"]), []).append(tuple(int(r[c]) for c in SORT))
    return {u: sorted(ev) for u, ev in by_user.items()}


def read_dir(path: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(path.glob("part-*.parquet"))])


@pytest.mark.parametrize("seed,bucket_rows", [(0, 10**9), (1, 300), (2, 97), (3, 1000)])
def test_hist_len_point_in_time_against_brute_force(tmp_path, seed, bucket_rows):
    rng = np.random.default_rng(seed)
    log = random_log(rng)
    write_log(tmp_path / "log" / "part-0.parquet", {k: v[:1200] for k, v in log.items()})
    write_log(tmp_path / "log" / "part-1.parquet", {k: v[1200:] for k, v in log.items()})
    meta = build(
        tmp_path / "log",
        tmp_path / "data",
        BuildConfig(max_len=8, split_ts=1_600_000_030, bucket_rows=bucket_rows),
        progress=False,
    )
    ref = reference(log)

    seq = read_dir(tmp_path / "data" / "sequences").to_pydict()
    assert sorted(seq["user_id"]) == sorted(ref)
    for i, u in enumerate(seq["user_id"]):
        got = list(zip(*(seq[c][i] for c in SORT)))
        assert got == ref[u], f"user {u} sequence not sorted by (ts, item_id, ...)"

    n = 0
    for split in ("train", "eval"):
        t = read_dir(tmp_path / "data" / split).to_pydict()
        for u, ts, h in zip(t["user_id"], t["ts"], t["hist_len"]):
            expected = sum(1 for e in ref[u] if e[0] < ts)  # strictly earlier: ties excluded
            assert h == expected
            assert (ts >= 1_600_000_030) == (split == "eval")
            n += 1
    assert n == len(log["user_id"]) == meta["rows"]["events"]
    assert meta["rows"]["train"] + meta["rows"]["eval"] == n


def test_vectorised_hist_len_small_case():
    user = np.array([1, 1, 1, 1, 2, 2, 2])
    ts = np.array([5, 5, 6, 9, 1, 1, 1])
    assert point_in_time_hist_len(user, ts).tolist() == [0, 0, 2, 3, 0, 0, 0]


def test_sequences_do_not_grow_with_max_len(tmp_path):
    log = random_log(np.random.default_rng(5), rows=3000)
    write_log(tmp_path / "log.parquet", log)
    sizes = {}
    for L in (2, 50, 5000):
        build(
            tmp_path / "log.parquet",
            tmp_path / f"d{L}",
            BuildConfig(max_len=L, test_days=0.0002),
            progress=False,
        )
        sizes[L] = {
            d: sum(f.stat().st_size for f in (tmp_path / f"d{L}" / d).iterdir())
            for d in ("sequences", "train", "eval")
        }
    assert sizes[2] == sizes[50] == sizes[5000]
    total_events = 3000
    assert (
        len(read_dir(tmp_path / "d5000" / "sequences").column("item_id").combine_chunks().flatten())
        == total_events
    )


def test_time_split_by_test_days_and_split_ts(tmp_path):
    day = 86400
    ts = np.array([0, 1, 2, 3, 4]) * day + 1_600_000_000
    write_log(
        tmp_path / "log.parquet",
        {"user_id": [1] * 5, "item_id": [1, 2, 3, 4, 5], "ts": ts, "label": [0, 1, 0, 1, 0]},
    )
    meta = build(
        tmp_path / "log.parquet", tmp_path / "a", BuildConfig(max_len=4, test_days=2), progress=False
    )
    assert meta["split"]["split_ts"] == ts[-1] + 1 - 2 * day
    assert read_dir(tmp_path / "a" / "eval")["ts"].to_pylist() == ts[3:].tolist()
    assert read_dir(tmp_path / "a" / "train")["ts"].to_pylist() == ts[:3].tolist()
    meta = build(
        tmp_path / "log.parquet", tmp_path / "b", BuildConfig(max_len=4, split_ts=int(ts[1])), progress=False
    )
    assert read_dir(tmp_path / "b" / "eval")["ts"].to_pylist() == ts[1:].tolist()
    assert read_dir(tmp_path / "b" / "eval")["hist_len"].to_pylist() == [1, 2, 3, 4]
    assert json.loads((tmp_path / "b" / "meta.json").read_text()) == json.loads(json.dumps(meta))


@pytest.mark.parametrize("split_ts,which", [(1_600_000_000, "train"), (1_700_000_000, "eval")])
def test_split_leaving_a_side_empty_is_refused(tmp_path, split_ts, which):
    write_log(
        tmp_path / "log.parquet",
        {"user_id": [1, 1], "item_id": [1, 2], "ts": [1_600_000_000, 1_600_000_010], "label": [0, 1]},
    )
    with pytest.raises(LogError, match=f"leaves {which} empty"):
        build(
            tmp_path / "log.parquet",
            tmp_path / "d",
            BuildConfig(max_len=4, split_ts=split_ts),
            progress=False,
        )
    assert not (tmp_path / "d").exists()


def test_bad_log_leaves_nothing_behind(tmp_path):
    log = random_log(np.random.default_rng(0), rows=500)
    write_log(tmp_path / "log" / "a.parquet", log)
    log["item_id"][77] = -1
    write_log(tmp_path / "log" / "b.parquet", log)
    with pytest.raises(LogError, match="b.parquet.*column 'item_id'.*row 77"):
        build(tmp_path / "log", tmp_path / "d", BuildConfig(max_len=4), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


def test_existing_output_refused_unless_overwrite(tmp_path):
    write_log(tmp_path / "log.parquet", random_log(np.random.default_rng(0), rows=100))
    cfg = BuildConfig(max_len=4, test_days=0.0002)
    build(tmp_path / "log.parquet", tmp_path / "d", cfg, progress=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        build(tmp_path / "log.parquet", tmp_path / "d", cfg, progress=False)
    build(tmp_path / "log.parquet", tmp_path / "d", cfg, overwrite=True, progress=False)
    assert (tmp_path / "d" / "meta.json").is_file()


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"max_len": 0}, "max-len"),
        ({"max_len": 5, "test_days": -1}, "test-days"),
        ({"max_len": 5, "test_days": 1, "split_ts": 3}, "not both"),
    ],
)
def test_bad_build_flags(kw, msg):
    with pytest.raises(ValueError, match=msg):
        BuildConfig(**kw)


def test_output_independent_of_log_row_order_and_bucketing(tmp_path):
    rng = np.random.default_rng(11)
    log = random_log(rng, rows=1500)
    perm = rng.permutation(1500)
    write_log(tmp_path / "a.parquet", log)
    write_log(tmp_path / "b.parquet", {k: v[perm] for k, v in log.items()})
    build(
        tmp_path / "a.parquet",
        tmp_path / "da",
        BuildConfig(max_len=4, split_ts=1_600_000_020),
        progress=False,
    )
    build(
        tmp_path / "b.parquet",
        tmp_path / "db",
        BuildConfig(max_len=4, split_ts=1_600_000_020, bucket_rows=200),
        progress=False,
    )
    for d in ("sequences", "train", "eval"):
        a, b = read_dir(tmp_path / "da" / d), read_dir(tmp_path / "db" / d)
        ka = sorted(zip(*[a[c].to_pylist() for c in a.column_names]), key=lambda r: str(r))
        kb = sorted(zip(*[b[c].to_pylist() for c in b.column_names]), key=lambda r: str(r))
        assert len(ka) > 0 and ka == kb, d

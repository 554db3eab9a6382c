"""`longer synth --format taobao`: a log in Taobao UserBehavior's shape, read by `longer import
taobao` and built — the importer and the hashing regime (ids far above the table sizes)."""

import json

import numpy as np
import pyarrow.csv as pcsv
import pytest

from feature_store.builder import BuildConfig, build, read_meta
from feature_store.importers import import_taobao
from feature_store.loader import BatchLoader
from feature_store.synth_taobao import synthesize_taobao, taobao_config
from tests.test_trainer import run


def test_taobao_shaped_log_goes_through_the_importer_and_the_builder(tmp_path):
    cfg = taobao_config(users=150, items=20_000, events_per_user=80, seed=3)
    s = synthesize_taobao(cfg, tmp_path / "tb", progress=False)
    csv = pcsv.read_csv(
        tmp_path / "tb" / "UserBehavior.csv",
        read_options=pcsv.ReadOptions(column_names=["user", "item", "category", "behavior", "ts"]),
    )
    assert csv.num_rows == s["rows"] > 150 * 40
    behaviour = csv.column("behavior").to_numpy(zero_copy_only=False)
    assert set(behaviour) == {"pv", "cart", "fav", "buy"}
    assert 0.07 < np.mean(behaviour != "pv") < 0.13 and s["positive_share"] == pytest.approx(
        np.mean(behaviour != "pv"), abs=1e-4
    )
    items, cats, users = (csv.column(c).to_numpy() for c in ("item", "category", "user"))
    assert items.max() > 1_000_000 and cats.max() > 1_000_000  # ids in the millions: hashing matters
    assert len(np.unique(cats)) > 300  # many categories
    top = np.sort(np.unique(items, return_counts=True)[1])[::-1]
    assert top[: len(top) // 100].sum() > 0.1 * len(items)  # power law: the top 1 % of items > 10 % of events
    ts = csv.column("ts").to_numpy()
    assert ts.min() >= 1_511_539_200 and ts.max() < 1_511_539_200 + 9 * 86400
    assert len(np.unique(users)) == 150

    imported = import_taobao(tmp_path / "tb", tmp_path / "log", progress=False)
    assert imported["rows"] == csv.num_rows
    build(tmp_path / "log", tmp_path / "data", BuildConfig(max_len=64, test_days=1), progress=False)
    meta = read_meta(tmp_path / "data")
    assert meta["rows"]["train"] + meta["rows"]["eval"] == csv.num_rows
    b = next(iter(BatchLoader(tmp_path / "data", "eval", batch_size=256, max_len=64)))
    assert b.sparse["item_id"].values().max() > 1_000_000  # raw ids reach the model; it hashes them
    assert 0 < float(b.labels.mean()) < 0.3


def test_cli_synth_taobao_then_import(tmp_path):
    r = run(
        [
            "synth",
            "--format",
            "taobao",
            "--users",
            "20",
            "--items",
            "2000",
            "--events-per-user",
            "30",
            "--out",
            tmp_path / "tb",
            "--quiet",
        ]
    )
    out = json.loads(r.stdout)
    assert out["format"] == "taobao" and (tmp_path / "tb" / "UserBehavior.csv").is_file()
    r = run(["import", "taobao", tmp_path / "tb", "--out", tmp_path / "log", "--quiet"])
    assert json.loads(r.stdout)["rows"] == out["rows"]
    r = run(
        [
            "synth",
            "--format",
            "taobao",
            "--users",
            "2000000",
            "--items",
            "10",
            "--events-per-user",
            "2",
            "--out",
            tmp_path / "big",
        ],
        check=False,
    )
    assert r.returncode == 2 and "exceed Taobao's id range" in r.stderr, r.stderr
    assert not (tmp_path / "big").exists()

"""The loader with a declared feature spec (issue 15): every kind of column in the batch,
list columns as jagged KJT keys, dense columns normalised with train statistics."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from feature_store.builder import BuildConfig, build
from feature_store.loader import BatchLoader
from longer.spec import FeatureSpec
from tests.conftest import random_log, write_log
from tests.test_build_features import SPEC, SPLIT, rich_log


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec_loader")
    write_log(d / "log.parquet", rich_log(np.random.default_rng(0)))
    build(
        d / "log.parquet",
        d / "data",
        BuildConfig(max_len=8, split_ts=SPLIT, bucket_rows=300),
        progress=False,
        spec=SPEC,
    )
    return d / "data"


def one_batch(data, split="train", **kw):
    loader = BatchLoader(data, split, batch_size=10**6, shuffle=False, **kw)
    return next(iter(loader)), pq.read_table(data / split).to_pydict()


def test_batch_carries_every_declared_kind(data):
    b, rows = one_batch(data, spec=SPEC)
    assert tuple(b.sparse.keys()) == SPEC.sparse_keys
    d = b.sparse.to_dict()
    seq = pa.concat_tables(
        [pq.read_table(f) for f in sorted((data / "sequences").glob("*.parquet"))]
    ).to_pydict()
    by_user = {u: i for i, u in enumerate(seq["user_id"])}
    hist_tags = torch.split(d["hist_tags"].values(), d["hist_tags"].lengths().tolist())
    hist_items = torch.split(d["hist_item_id"].values(), d["hist_item_id"].lengths().tolist())
    per_event = torch.split(b.event_lengths["hist_tags"], b.hist_lengths.tolist())
    cand_tags = torch.split(d["tags"].values(), d["tags"].lengths().tolist())
    order = b.row_id.tolist()
    for i, r in enumerate(order):
        u, h = rows["user_id"][r], rows["hist_len"][r]
        lo = max(0, h - 8)
        events = seq["tags"][by_user[u]][lo:h]
        assert hist_items[i].tolist() == seq["item_id"][by_user[u]][lo:h]
        assert hist_tags[i].tolist() == [t for e in events for t in e]
        assert per_event[i].tolist() == [len(e) for e in events]
        assert cand_tags[i].tolist() == rows["tags"][r]
    for key in ("item_id", "brand", "tier", "device", "user_id"):
        assert d[key].lengths().eq(1).all() and d[key].values().tolist() == [rows[key][r] for r in order], key
    meta_stats = SPEC.resolve(__import__("json").loads((data / "meta.json").read_text())).dense_stats["price"]
    want = (np.array([rows["price"][r] for r in order]) - meta_stats[0]) / meta_stats[1]
    assert b.dense["price"].dtype == torch.float32
    assert np.allclose(b.dense["price"].numpy(), want, atol=1e-5)
    assert set(b.dense) == {"price"}


def test_shuffled_batches_keep_list_rows_together(data):
    """Shuffled and cut into batches, each sample's list values stay its own."""
    rows = pq.read_table(data / "train").to_pydict()
    seen = 0
    for b in BatchLoader(data, "train", batch_size=37, shuffle=True, seed=1, spec=SPEC):
        d = b.sparse.to_dict()
        tags = torch.split(d["tags"].values(), d["tags"].lengths().tolist())
        for i, r in enumerate(b.row_id.tolist()):
            assert tags[i].tolist() == rows["tags"][r]
        seen += b.batch_size
    assert seen == len(rows["user_id"])


def test_default_spec_batch_equals_todays_batch(tmp_path):
    write_log(tmp_path / "log.parquet", random_log(np.random.default_rng(0)))
    build(tmp_path / "log.parquet", tmp_path / "data", BuildConfig(max_len=8, split_ts=SPLIT), progress=False)
    old, _ = one_batch(tmp_path / "data", dense_features=[])
    new, _ = one_batch(tmp_path / "data", spec=FeatureSpec())
    assert new.sparse.keys() == old.sparse.keys() == list(FeatureSpec().sparse_keys)
    assert torch.equal(new.sparse.values(), old.sparse.values())
    assert torch.equal(new.sparse.lengths(), old.sparse.lengths())
    assert torch.equal(new.hist_ts, old.hist_ts) and new.event_lengths == {} and new.dense == {}


def test_spec_and_dense_features_are_exclusive(data):
    with pytest.raises(ValueError, match="not both"):
        BatchLoader(data, "train", spec=SPEC, dense_features=["price"])

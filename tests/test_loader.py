import itertools

import numpy as np
import pytest
import torch

from feature_store.builder import BuildConfig, build
from feature_store.loader import BatchLoader
from tests.conftest import random_log, write_log
from tests.test_builder import reference


def row_ids(loader, limit=None):
    """Row ids per batch; with `limit`, pulls exactly that many batches (the state counts pulls)."""
    return [b.row_id.tolist() for b in itertools.islice(loader, limit)]


def flat(batches):
    return [r for b in batches for r in b]


def test_history_is_point_in_time_slice(tmp_path):
    rng = np.random.default_rng(3)
    log = random_log(rng, users=12, rows=1500, ts_range=60)
    write_log(tmp_path / "log.parquet", log)
    build(
        tmp_path / "log.parquet",
        tmp_path / "d",
        BuildConfig(max_len=40, split_ts=1_600_000_045, bucket_rows=400),
        progress=False,
    )
    ref = reference(log)
    seen = 0
    for split in ("train", "eval"):
        for L in (40, 7):
            loader = BatchLoader(tmp_path / "d", split, batch_size=64, max_len=L, seed=1)
            for b in loader:
                feats = {k: jt.to_dense() for k, jt in b.sparse.to_dict().items()}
                ts_rows = torch.split(b.hist_ts, b.hist_lengths.tolist())
                for i in range(b.batch_size):
                    u, ts = int(feats["user_id"][i]), int(b.ts[i])
                    hist = [e for e in ref[u] if e[0] < ts][-L:]
                    assert feats["hist_item_id"][i].tolist() == [e[1] for e in hist]
                    assert feats["hist_category_id"][i].tolist() == [e[3] for e in hist]
                    assert feats["hist_action"][i].tolist() == [e[4] for e in hist]
                    assert ts_rows[i].tolist() == [e[0] for e in hist]
                    assert all(t < ts for t in ts_rows[i].tolist())
                    seen += 1
    assert seen == 2 * len(log["user_id"])


def test_eval_order_is_stable_and_complete(synth_dataset):
    loader = BatchLoader(synth_dataset, "eval", batch_size=100)
    ids = flat(row_ids(loader))
    assert ids == list(range(loader.num_rows))
    assert len(row_ids(loader)) == len(loader)


def test_shuffle_is_seeded_and_complete(synth_dataset):
    a = flat(row_ids(BatchLoader(synth_dataset, batch_size=256, seed=5, shuffle_window=2)))
    b = flat(row_ids(BatchLoader(synth_dataset, batch_size=256, seed=5, shuffle_window=2)))
    c = flat(row_ids(BatchLoader(synth_dataset, batch_size=256, seed=6, shuffle_window=2)))
    assert a == b
    assert a != c
    assert sorted(a) == sorted(c) == list(range(len(a)))
    assert a != sorted(a)


def test_epochs_differ_and_state_advances(synth_dataset):
    loader = BatchLoader(synth_dataset, batch_size=300, seed=1)
    e0, e1 = flat(row_ids(loader)), flat(row_ids(loader))
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["position"] == 0


@pytest.mark.parametrize("stop", [1, 7, 19])
def test_resume_continues_with_exactly_the_next_batch(synth_dataset, stop):
    full = BatchLoader(synth_dataset, batch_size=97, seed=3, shuffle_window=3)
    uninterrupted = row_ids(full) + row_ids(full)  # two epochs

    first = BatchLoader(synth_dataset, batch_size=97, seed=3, shuffle_window=3)
    part = row_ids(first, limit=stop)
    state = first.state_dict()
    resumed = BatchLoader(synth_dataset, batch_size=97, seed=3, shuffle_window=3)
    resumed.load_state_dict(state)
    rest = row_ids(resumed) + row_ids(resumed)
    assert part + rest[: len(uninterrupted) - stop] == uninterrupted


def test_resume_state_checks(synth_dataset):
    loader = BatchLoader(synth_dataset, batch_size=64, seed=3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        BatchLoader(synth_dataset, batch_size=64, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict({**state, "position": loader.num_rows + 1})


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_complete(synth_dataset, world):
    per_rank = [
        flat(row_ids(BatchLoader(synth_dataset, batch_size=50, seed=2, rank=r, world_size=world)))
        for r in range(world)
    ]
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union))
    assert sorted(union) == list(range(BatchLoader(synth_dataset).num_rows))
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    for r, ids in enumerate(per_rank):
        assert len(ids) == BatchLoader(synth_dataset, rank=r, world_size=world).rank_samples()


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_resume_with_other_world_size_sees_every_sample_once(synth_dataset, before, after):
    kw = dict(batch_size=40, seed=9, shuffle_window=2)
    loaders = [BatchLoader(synth_dataset, rank=r, world_size=before, **kw) for r in range(before)]
    done = [i for ld in loaders for i in flat(row_ids(ld, limit=5))]
    states = {str(ld.state_dict()) for ld in loaders}
    assert len(states) == 1  # every rank holds the same, world-size independent state
    rest = []
    for r in range(after):
        ld = BatchLoader(synth_dataset, rank=r, world_size=after, **kw)
        ld.load_state_dict(loaders[0].state_dict())
        rest += flat(row_ids(ld))
    everything = done + rest
    assert sorted(everything) == list(range(loaders[0].num_rows))
    # and the resumed stream is the uninterrupted epoch's, just dealt to a different number of ranks
    single = flat(row_ids(BatchLoader(synth_dataset, **kw)))
    assert set(single[len(done) :]) == set(rest)


def test_max_len_cannot_exceed_the_build(synth_dataset):
    with pytest.raises(ValueError, match="max_len must be in \\[1, 256\\]"):
        BatchLoader(synth_dataset, max_len=257)
    b = next(iter(BatchLoader(synth_dataset, max_len=3, batch_size=500)))
    assert int(b.hist_lengths.max()) == 3


def test_bad_arguments(synth_dataset, tmp_path):
    with pytest.raises(ValueError, match="split"):
        BatchLoader(synth_dataset, "test")
    with pytest.raises(ValueError, match="history feature 'price'"):
        BatchLoader(synth_dataset, history_features=["price"])
    with pytest.raises(ValueError, match="candidate feature 'action'"):
        BatchLoader(synth_dataset, candidate_features=["item_id", "action"])
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(synth_dataset, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        BatchLoader(tmp_path)


def test_prefetch_matches_and_drop_last(synth_dataset):
    kw = dict(batch_size=128, seed=4)
    assert row_ids(BatchLoader(synth_dataset, prefetch=2, **kw)) == row_ids(BatchLoader(synth_dataset, **kw))
    loader = BatchLoader(synth_dataset, drop_last=True, **kw)
    batches = row_ids(loader)
    assert len(batches) == len(BatchLoader(synth_dataset, drop_last=True, **kw)) == loader.num_rows // 128
    assert all(len(b) == 128 for b in batches)


def test_prefetch_stops_cleanly_when_abandoned(synth_dataset):
    loader = BatchLoader(synth_dataset, batch_size=16, prefetch=2)
    it = iter(loader)
    next(it)
    it.close()  # the producer thread must exit, not block on a full queue
    import threading

    assert not any(t.name == "longer-loader" and t.is_alive() for t in threading.enumerate())


def test_batch_feeds_an_embedding_collection(synth_dataset):
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection

    from feature_store.builder import read_meta

    card = read_meta(synth_dataset)["cardinalities"]
    tables = [
        EmbeddingConfig(
            name="item",
            embedding_dim=8,
            num_embeddings=card["item_id"]["max_id"] + 1,
            feature_names=["hist_item_id", "item_id"],
        ),
        EmbeddingConfig(
            name="category",
            embedding_dim=8,
            num_embeddings=card["category_id"]["max_id"] + 1,
            feature_names=["hist_category_id", "category_id"],
        ),
        EmbeddingConfig(
            name="action",
            embedding_dim=8,
            num_embeddings=card["action"]["max_id"] + 1,
            feature_names=["hist_action"],
        ),
        EmbeddingConfig(
            name="user",
            embedding_dim=8,
            num_embeddings=card["user_id"]["max_id"] + 1,
            feature_names=["user_id"],
        ),
    ]
    ec = EmbeddingCollection(tables=tables, device=torch.device("cpu"))
    batch = next(iter(BatchLoader(synth_dataset, batch_size=32))).to(torch.device("cpu"), non_blocking=False)
    out = ec(batch.sparse)
    n_hist = int(batch.hist_lengths.sum())
    assert out["hist_item_id"].values().shape == (n_hist, 8)
    assert torch.equal(
        out["hist_item_id"].lengths(), batch.hist_lengths.to(out["hist_item_id"].lengths().dtype)
    )
    assert out["item_id"].values().shape == (32, 8)
    # the shared table: the same id gives the same vector whether it is history or candidate
    item = int(batch.sparse["item_id"].values()[0])
    hist_ids = batch.sparse["hist_item_id"].values()
    if (hist_ids == item).any():
        j = int(torch.nonzero(hist_ids == item)[0])
        assert torch.equal(out["hist_item_id"].values()[j], out["item_id"].values()[0])
    out["item_id"].values().sum().backward()
    assert batch.dense["p_true"].shape == (32,) and batch.labels.dtype == torch.float32


@pytest.mark.parametrize("world", [1, 2, 3])
def test_drop_last_gives_every_rank_the_same_number_of_full_batches(synth_dataset, world):
    loaders = [
        BatchLoader(synth_dataset, batch_size=96, seed=1, rank=r, world_size=world, drop_last=True)
        for r in range(world)
    ]
    counts = {len(ld) for ld in loaders}
    batches = [row_ids(ld) for ld in loaders]
    assert {len(b) for b in batches} == counts == {loaders[0].num_rows // (96 * world)}
    assert all(len(b) == 96 for rank in batches for b in rank)
    assert {str(ld.state_dict()) for ld in loaders} == {str({**loaders[0].state_dict()})}

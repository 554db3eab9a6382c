"""Request-level batching: the loader with requests as its unit, and the model encoding each
request once (feature_store/loader.py "Units", longer/requests.py)."""

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_store.loader import BatchLoader
from longer.config import ModelConfig
from longer.recmodel import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig.from_toml(REPO / "configs" / "tiny.toml")


def rows(loader, limit=None):
    return [b.row_id.tolist() for b in itertools.islice(loader, limit)]


def request_keys(loader):
    """(user_id, ts, hist_len) of every sample, by row id, read straight from the split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.concat_tables(
        pq.read_table(f, columns=["user_id", "ts", "hist_len"])
        for f in sorted((loader.data_dir / loader.split).glob("part-*.parquet"))
    )
    return list(zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True))


def test_requests_are_units_kept_whole(synth_dataset):
    loader = BatchLoader(synth_dataset, batch_size=40, seed=1, shuffle_window=2, requests=True)
    keys = request_keys(loader)
    assert loader.num_units < loader.num_rows  # the synth log has same-second events
    assert loader.num_units == len(set(keys))  # requests never span row groups here
    seen, n_batches = [], 0
    for b in loader:
        n_batches += 1
        req = b.request.numpy() if b.request is not None else np.arange(b.batch_size)
        assert req.max() + 1 <= 40
        ids = b.row_id.tolist()
        for r in np.unique(req):
            members = {keys[i] for i in np.asarray(ids)[req == r]}
            assert len(members) == 1  # a request's samples share (user, ts, hist_len)
        # each request's history is stored once, on its first sample
        lengths = b.sparse["hist_item_id"].lengths()
        first = np.r_[True, req[1:] != req[:-1]]
        assert (lengths[~first] == 0).all()
        assert torch.equal(lengths[first], b.hist_lengths[first])
        seen += ids
    assert sorted(seen) == list(range(loader.num_rows))
    assert n_batches == -(-loader.num_units // 40)


@pytest.mark.parametrize("stop", [1, 5])
def test_request_resume_continues_with_exactly_the_next_batch(synth_dataset, stop):
    def make():
        return BatchLoader(synth_dataset, batch_size=37, seed=3, shuffle_window=3, requests=True)

    full = make()
    uninterrupted = rows(full) + rows(full)
    first = make()
    part = rows(first, limit=stop)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    rest = rows(resumed) + rows(resumed)
    assert part + rest[: len(uninterrupted) - stop] == uninterrupted
    with pytest.raises(ValueError, match="requests"):
        BatchLoader(synth_dataset, batch_size=37, seed=3).load_state_dict(first.state_dict())


@pytest.mark.parametrize("world", [2, 3])
def test_request_ranks_are_disjoint_and_complete(synth_dataset, world):
    keys = None
    per_rank = []
    for r in range(world):
        loader = BatchLoader(synth_dataset, batch_size=30, seed=2, rank=r, world_size=world, requests=True)
        keys = keys or request_keys(loader)
        per_rank.append([i for b in rows(loader) for i in b])
    union = [i for ids in per_rank for i in ids]
    assert sorted(union) == list(range(len(keys)))
    owners = {}
    for r, ids in enumerate(per_rank):  # a request lives on one rank
        for i in ids:
            assert owners.setdefault(keys[i], r) == r


def grads(model, batch):
    model.zero_grad()
    logits = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "arch,encoding",
    [("longer", "recency"), ("transformer", "recency"), ("din", "recency"), ("hstu", "recency")]
    + [("longer", "append_stable")],  # its grid needs hist_total per request (request_view)
)
def test_request_batching_equals_per_sample_gradients(synth_dataset, arch, encoding):
    loader = BatchLoader(synth_dataset, batch_size=64, shuffle=False, max_len=64, requests=True)
    cols, sizes = next(loader.units(0))
    keep = int(sizes[:64].sum())
    cols, sizes = {c: v[:keep] for c, v in cols.items()}, sizes[:64]
    assert sizes.max() > 1
    per_request, per_sample = loader.assemble(cols, sizes), loader.assemble(cols)
    assert per_request.request is not None and per_sample.request is None
    assert per_request.sparse.values().numel() < per_sample.sparse.values().numel()

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, arch=arch, encoding=encoding))  # fp32
    logits_r, grad_r = grads(model, per_request)
    logits_s, grad_s = grads(model, per_sample)
    torch.testing.assert_close(logits_r, logits_s, rtol=0, atol=1e-5)
    assert grad_r.keys() == grad_s.keys() and len(grad_r) > 10
    for n in grad_s:
        assert grad_s[n].abs().sum() > 0 or n.startswith("net.copy"), n
        torch.testing.assert_close(grad_r[n], grad_s[n], rtol=0, atol=1e-5, msg=n)


def test_synth_impressions_per_request(tmp_path):
    import pyarrow.parquet as pq

    from feature_store.builder import BuildConfig, build
    from feature_store.synth import SynthConfig, synthesize

    base = dict(users=20, items=200, events_per_user=60, seed=4, days=10)
    synthesize(SynthConfig(**base), tmp_path / "one", progress=False)
    synthesize(SynthConfig(**base, impressions_per_request=10), tmp_path / "ten", progress=False)
    one, ten = (pq.read_table(tmp_path / d) for d in ("one", "ten"))
    assert one.drop(["ts"]).equals(ten.drop(["ts"]))  # only the times change
    user = one.column("user_id").to_numpy()
    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])  # the log is user by user
    e = np.arange(len(user)) - np.repeat(first, np.diff(np.r_[first, len(user)]))
    run_first = np.arange(len(user)) - e % 10  # row of each event's request's first impression
    assert (ten.column("ts").to_numpy() == one.column("ts").to_numpy()[run_first]).all()
    with pytest.raises(ValueError, match="impressions-per-request"):
        SynthConfig(**base, impressions_per_request=0)

    build(tmp_path / "ten", tmp_path / "d", BuildConfig(max_len=64, test_days=2), progress=False)
    loader = BatchLoader(tmp_path / "d", batch_size=8, requests=True)
    assert loader.num_units <= loader.num_rows / 9  # ~10 impressions per request

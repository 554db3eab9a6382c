"""Hand-made batches for benchmarks and tests that need no dataset (not shipped to the
trainer or the service): `random_batch` draws one with given history lengths, `split_batch`
turns a batch back into the lists `random_batch` takes, so a test can edit one sample."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feature_store.batch import DEFAULT_KEYS, HIST_PREFIX, Batch, hist_key
from longer.interface import Candidates

T0 = 1_700_000_000


def random_batch(
    lengths, seed=0, items=500, categories=20, hist=None, cand=None, ts=None, users=None, totals=None
) -> Batch:
    """A random batch with the given history lengths. `hist` (per sample: dict of lists) and `cand`
    (per sample: (item, category)), `ts` and `users` override the defaults; `totals` the users'
    event counts (`Batch.hist_total`; default: the history is all of the user's events)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    hist = hist or [
        {
            "hist_item_id": torch.randint(0, items, (n,), generator=g).tolist(),
            "hist_category_id": torch.randint(0, categories, (n,), generator=g).tolist(),
            "hist_action": torch.randint(1, 4, (n,), generator=g).tolist(),
            "ts": sorted((T0 + torch.randint(0, 86400 * 30, (n,), generator=g)).tolist()),
        }
        for n in lengths
    ]
    cand = cand or [
        (
            int(torch.randint(0, items, (1,), generator=g)),
            int(torch.randint(0, categories, (1,), generator=g)),
        )
        for _ in range(B)
    ]
    ts = ts or [max(h["ts"], default=T0) + 3600 + i for i, h in enumerate(hist)]
    values, lens = [], []
    for key in DEFAULT_KEYS:
        for b in range(B):
            if key.startswith(HIST_PREFIX):
                v = hist[b][key]
            elif key == "item_id":
                v = [cand[b][0]]
            elif key == "category_id":
                v = [cand[b][1]]
            else:
                v = [users[b] if users else b + 1]
            values += v
            lens.append(len(v))
    return Batch(
        sparse=KeyedJaggedTensor(
            keys=list(DEFAULT_KEYS),
            values=torch.tensor(values, dtype=torch.long),
            lengths=torch.tensor(lens, dtype=torch.long),
        ),
        hist_ts=torch.tensor([t for h in hist for t in h["ts"]], dtype=torch.long),
        hist_lengths=torch.tensor([len(h["ts"]) for h in hist], dtype=torch.long),
        hist_total=torch.tensor(totals or [len(h["ts"]) for h in hist], dtype=torch.long),
        ts=torch.tensor(ts, dtype=torch.long),
        labels=torch.randint(0, 2, (B,), generator=g).float(),
        row_id=torch.arange(B),
    )


def split_batch(batch: Batch) -> tuple[list[dict], list[tuple[int, int]], list[int]]:
    """(hist, cand, ts) lists that random_batch turns back into the same batch."""
    d = {k: jt.to_dense() for k, jt in batch.sparse.to_dict().items()}
    ts = torch.split(batch.hist_ts, batch.hist_lengths.tolist())
    keys = [k for k in DEFAULT_KEYS if k.startswith(HIST_PREFIX)]
    hist = [{k: d[k][i].tolist() for k in keys} | {"ts": ts[i].tolist()} for i in range(batch.batch_size)]
    cand = [(int(d["item_id"][i]), int(d["category_id"][i])) for i in range(batch.batch_size)]
    return hist, cand, batch.ts.tolist()


def spec_samples(spec, lengths, seed=0, list_len=3) -> list[dict]:
    """Random samples for any resolved FeatureSpec, one per history length, as plain dicts a test
    can edit: "hist" {hist_<c>: per-event values (a list column: per-event lists), "ts": [...]},
    every candidate/user/context key → an id (a list column: a list, possibly empty), every dense
    key → a float, "ts" → the request time. `spec_batch` turns them into a Batch."""
    g = torch.Generator().manual_seed(seed)

    def draw(column, n=None):
        rows = int(spec.buckets.get(column, 20))
        one = lambda: int(torch.randint(0, 3 * rows, (1,), generator=g))  # noqa: E731 (hashed beyond the table)
        if spec.is_list(column):
            return [
                [one() for _ in range(int(torch.randint(0, list_len + 1, (1,), generator=g)))]
                for _ in range(n or 1)
            ]
        return [one() for _ in range(n or 1)]

    out = []
    for i, n in enumerate(lengths):
        hist = {hist_key(c): draw(c, n) if n else [] for c in spec.history_fields}
        hist["ts"] = sorted((T0 + torch.randint(0, 86400 * 30, (n,), generator=g)).tolist())
        s = {"hist": hist, "ts": max(hist["ts"], default=T0) + 3600 + i, "user_id": i + 1}
        for k in (*spec.candidate_keys, *spec.user[:], *spec.context_keys):
            s[k] = draw(k)[0]
        for k in spec.dense_keys:
            s[k] = float(torch.randn(1, generator=g))
        out.append(s)
    return out


def spec_batch(spec, samples: list[dict]) -> Batch:
    """The Batch of `spec_samples`-style dicts, with exactly the spec's keys (as the loader)."""
    values, lens, event_lengths = [], [], {}
    for key in spec.sparse_keys:
        column = key[len(HIST_PREFIX) :] if key in spec.history_keys else key
        for s in samples:
            v = s["hist"][key] if key in spec.history_keys else [s[key]]
            if spec.is_list(column):
                if key in spec.history_keys:
                    event_lengths.setdefault(key, []).extend(len(e) for e in v)
                v = [x for e in v for x in e]
            values += v
            lens.append(len(v))
    return Batch(
        sparse=KeyedJaggedTensor(
            keys=list(spec.sparse_keys),
            values=torch.tensor(values, dtype=torch.long),
            lengths=torch.tensor(lens, dtype=torch.long),
        ),
        hist_ts=torch.tensor([t for s in samples for t in s["hist"]["ts"]], dtype=torch.long),
        hist_lengths=torch.tensor([len(s["hist"]["ts"]) for s in samples], dtype=torch.long),
        hist_total=torch.tensor([len(s["hist"]["ts"]) for s in samples], dtype=torch.long),
        ts=torch.tensor([s["ts"] for s in samples], dtype=torch.long),
        labels=torch.tensor([float(i % 2) for i in range(len(samples))]),
        row_id=torch.arange(len(samples)),
        dense={k: torch.tensor([s[k] for s in samples], dtype=torch.float32) for k in spec.dense_keys},
        event_lengths={k: torch.tensor(v, dtype=torch.long) for k, v in event_lengths.items()},
    )


def padded(rows: list) -> torch.Tensor:
    """Per-row id lists → (len, M) padded with -1 (M >= 1), as `Candidates` takes list columns."""
    M = max(1, *(len(r) for r in rows))
    return torch.tensor([r + [-1] * (M - len(r)) for r in rows], dtype=torch.long)


def spec_candidates(spec, samples: list[dict]) -> Candidates:
    """`spec_samples`-style dicts' candidate-side columns as N candidates of one user, with the
    first sample's request time and context."""

    def ids(k):
        v = [s[k] for s in samples]
        return padded(v)[None] if spec.is_list(k) else torch.tensor([v])

    ctx = samples[0]
    return Candidates(
        item_id=ids("item_id"),
        category_id=ids("category_id") if "category_id" in spec.candidate_keys else None,
        ts=torch.tensor([ctx["ts"]]),
        columns={k: ids(k) for k in spec.candidate if k != "category_id"},
        dense={k: torch.tensor([[s[k] for s in samples]]) for k in spec.dense},
        context={k: padded([ctx[k]]) if spec.is_list(k) else torch.tensor([ctx[k]]) for k in spec.context},
    )

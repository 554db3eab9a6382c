"""The training/eval batch: a TorchRec `Pipelineable` holding a KeyedJaggedTensor.

Keys of `sparse` (one KJT, so an EmbeddingCollection can share a table between a history key
and its candidate key, e.g. `hist_item_id` and `item_id` → table `item`):

    hist_<feature>   the sample's history, oldest first, length min(hist_len, max_len)
    <feature>        the candidate's own id (length 1): item_id, category_id, extra columns
    user_id          length 1

The candidate's `action` and `label` are never features: they are what happened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

# torch 2.13 logs a one-time notice whenever TorchRec asks `is_fx_tracing()` (every KJT does);
# it is about torch.export internals, not about anything a user of this project can act on.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

HIST_PREFIX = "hist_"


def hist_key(feature: str) -> str:
    return HIST_PREFIX + feature


# The loader's keys with its default features, in KJT order.
DEFAULT_KEYS = ("hist_item_id", "hist_category_id", "hist_action", "item_id", "category_id", "user_id")


@dataclass
class Batch(Pipelineable):
    sparse: KeyedJaggedTensor
    hist_ts: torch.Tensor  # int64 (Σ history lengths,): event seconds, aligned with hist_* values
    hist_lengths: torch.Tensor  # int64 (B,)
    # int64 (B,): the user's events before the sample (the sample's `hist_len`); the loaded
    # history holds the last `hist_lengths` of them, so history event i has absolute index
    # hist_total - hist_lengths + i (what the append-stable grid aligns to, longer/window.py)
    hist_total: torch.Tensor
    ts: torch.Tensor  # int64 (B,): the sample's (request) time
    labels: torch.Tensor  # float32 (B,)
    row_id: torch.Tensor  # int64 (B,): the sample's row number in its split, for predictions
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # float columns, e.g. p_true

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def _map(self, fn) -> Batch:
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = {k: fn(t) for k, t in v.items()} if isinstance(v, dict) else fn(v)
        return replace(self, **kw)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        self._map(lambda t: (t.record_stream(stream), t)[1])

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())


# --- hand-made batches, for tests and benchmarks that need no dataset -----------------------------

T0 = 1_700_000_000


def make_batch(
    lengths, seed=0, items=500, categories=20, hist=None, cand=None, ts=None, users=None, totals=None
) -> Batch:
    """A random batch with the given history lengths. `hist` (per sample: dict of lists) and `cand`
    (per sample: (item, category)), `ts` and `users` override the defaults; `totals` the users'
    event counts (default: the history is all of the user's events)."""
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
    """(hist, cand, ts) lists that make_batch turns back into the same batch."""
    d = {k: jt.to_dense() for k, jt in batch.sparse.to_dict().items()}
    ts = torch.split(batch.hist_ts, batch.hist_lengths.tolist())
    keys = [k for k in DEFAULT_KEYS if k.startswith(HIST_PREFIX)]
    hist = [{k: d[k][i].tolist() for k in keys} | {"ts": ts[i].tolist()} for i in range(batch.batch_size)]
    cand = [(int(d["item_id"][i]), int(d["category_id"][i])) for i in range(batch.batch_size)]
    return hist, cand, batch.ts.tolist()

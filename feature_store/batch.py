"""The training/eval batch: a TorchRec `Pipelineable` holding a KeyedJaggedTensor.

Keys of `sparse` (one KJT, so an EmbeddingCollection can share a table between a history key
and its candidate key, e.g. `hist_item_id` and `item_id` → table `item`):

    hist_<feature>   the sample's history, oldest first, length min(hist_len, max_len)
    <feature>        the candidate's own id (length 1): item_id, category_id, extra columns
    user_id          length 1

The candidate's `action` and `label` are never features: they are what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

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
    # int64 (Σ history lengths,) per list<int64> history key: how many of the key's values each
    # history event has (the KJT's length for that key is their sum per sample); pooling per event.
    event_lengths: dict[str, torch.Tensor] = field(default_factory=dict)
    # int64 (B,) or None: request-level batching (feature_store/loader.py "Units"). Sample i
    # belongs to request request[i] (consecutive, 0..R-1); only a request's first sample carries
    # the history in `sparse`, `hist_ts` and `event_lengths` (the others have empty history
    # keys); `hist_lengths` stays per sample. None: every sample is its own request.
    request: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def _map(self, fn) -> Batch:
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                kw[f.name] = {k: fn(t) for k, t in v.items()}
            else:
                kw[f.name] = None if v is None else fn(v)
        return replace(self, **kw)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        self._map(lambda t: (t.record_stream(stream), t)[1])

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())


def padding_batch() -> Batch:
    """A one-sample batch (one history event) with the default keys, for a rank that must make
    a call to keep collectives matched but has no data left; its outputs are dropped."""
    lengths = [1, 1, 1, 1, 1, 1]  # one value per key of DEFAULT_KEYS
    return Batch(
        sparse=KeyedJaggedTensor(
            keys=list(DEFAULT_KEYS),
            values=torch.ones(len(DEFAULT_KEYS), dtype=torch.long),
            lengths=torch.tensor(lengths, dtype=torch.long),
        ),
        hist_ts=torch.zeros(1, dtype=torch.long),
        hist_lengths=torch.ones(1, dtype=torch.long),
        hist_total=torch.ones(1, dtype=torch.long),
        ts=torch.full((1,), 3600, dtype=torch.long),
        labels=torch.zeros(1),
        row_id=torch.zeros(1, dtype=torch.long),
    )

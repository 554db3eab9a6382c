"""Columns of a declared feature spec as flat numpy arrays, for the loader's batch assembly.

Three shapes of column:

* scalar int64 / float64 columns: one numpy value per row;
* list<int64> sample columns (candidate, user, context): kept as a pyarrow ListArray while
  rows are shuffled and sliced (`take_rows`, `concat_rows`), flattened by `jagged` into
  (values, lengths) — exactly a KeyedJaggedTensor key's layout;
* list<int64> sequence columns: `EventLists`, every event's values in one flat array with
  per-event starts and lengths, so a batch's history is two vectorised gathers.

List columns go into the KJT jagged, not padded: the KJT is already the one sparse input
TorchRec shards and looks up, a jagged key costs exactly its values (a genre list is 1–6
ids: padding to the longest would double the lookups), and pooling is a segment reduction
over lengths. For a history list key the KJT's per-sample length is the number of values in
the sample's history; the per-event lengths that pooling needs travel beside it
(`Batch.event_lengths[key]`, one entry per history event).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated index ranges [s, s + l) for every (s, l), vectorised."""
    total = int(lengths.sum())
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return shift + np.arange(total, dtype=np.int64)


def segment_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of consecutive segments of `values` with these lengths (zero lengths allowed)."""
    cs = np.r_[0, np.cumsum(values, dtype=np.int64)]
    bounds = np.r_[0, np.cumsum(lengths, dtype=np.int64)]
    return cs[bounds[1:]] - cs[bounds[:-1]]


def is_list(v) -> bool:
    return isinstance(v, pa.Array | pa.ChunkedArray)


def take_rows(v, idx: np.ndarray):
    return v.take(pa.array(idx, pa.int64())) if is_list(v) else v[idx]


def concat_rows(parts: list):
    if is_list(parts[0]):
        return pa.concat_arrays([p.combine_chunks() if isinstance(p, pa.ChunkedArray) else p for p in parts])
    return np.concatenate(parts)


def jagged(v: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list<int64> array → (flat values int64, lengths int64), for one KJT key."""
    if isinstance(v, pa.ChunkedArray):
        v = v.combine_chunks()
    lengths = pc.list_value_length(v).to_numpy(zero_copy_only=False).astype(np.int64)
    return pc.list_flatten(v).to_numpy(zero_copy_only=False).astype(np.int64, copy=False), lengths


@dataclass(frozen=True)
class EventLists:
    """A list<int64> sequence column: event e's values are flat[start[e] : start[e] + length[e]]."""

    start: np.ndarray  # int64 (events,)
    length: np.ndarray  # int64 (events,)
    flat: np.ndarray  # int64 (Σ lengths,)

    @classmethod
    def from_arrow(cls, events: pa.Array) -> EventLists:
        values, lengths = jagged(events)
        return cls(np.cumsum(lengths) - lengths, lengths, values)

    @classmethod
    def concat(cls, parts: list[EventLists]) -> EventLists:
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        base = np.cumsum([0] + [len(p.flat) for p in parts[:-1]])
        return cls(
            np.concatenate([p.start + b for p, b in zip(parts, base)]),
            np.concatenate([p.length for p in parts]),
            np.concatenate([p.flat for p in parts]),
        )

    def take(self, events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, per-event lengths) of these events, in order."""
        lengths = self.length[events]
        return self.flat[ranges(self.start[events], lengths)], lengths


def normalised(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """A dense column with the train split's statistics; a constant column (std 0) is only centred."""
    return ((x - mean) / (std if std > 0 else 1.0)).astype(np.float32)

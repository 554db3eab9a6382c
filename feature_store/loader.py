"""Batch loader: dataset directory → `Batch`es ready for TorchRec's TrainPipelineSparseDist.

* Sequences are held once in memory as flat per-feature arrays plus per-user offsets (storage
  grows with events, not samples). A sample's history is the slice
  [hist_len - L, hist_len) of its user's events, L = min(hist_len, max_len).
* Samples stream from `train/` or `eval/` row groups. With shuffling, an epoch is a seeded
  permutation of row groups, taken `shuffle_window` row groups at a time, each window's rows
  permuted (a shuffle buffer over whole windows). Everything is a function of (seed, epoch),
  so the loader's state is just (epoch, position) and a resume continues with exactly the
  next batch, without replaying any data.
* Features: with a `FeatureSpec` (longer/spec.py) the batch carries exactly the spec's keys
  (`spec.sparse_keys`: history, candidate, user, context) and its dense columns, normalised
  with the build's train-split mean and std. list<int64> columns are jagged KJT keys (why:
  feature_store/columns.py); history list keys also give per-event lengths
  (`Batch.event_lengths`). Without a spec: the default spec's keys, as before.
* Partitioning: rank r of `world_size` takes the epoch-stream positions p ≥ start with
  (p - start) % world_size == r: disjoint, complete, per-rank counts within one. The state's
  position counts units (below) of all ranks, so a run can resume with a different world size.
* `ts_range=(lo, hi)` takes only the split's samples with lo <= ts < hi (a None bound is open):
  the trainer's validation split is the end of `train/` by time. Row ids keep the split's
  numbering.
* Units: a unit is a sample, or with `requests=True` a request: the consecutive samples of a
  row group sharing (user_id, ts, hence hist_len), i.e. the impressions one request showed.
  Shuffling, positions, partitioning and `batch_size` then count requests (a batch holds
  `batch_size` requests and all their samples); the batch's history is stored once per request,
  on the request's first sample (the others have empty history keys), and `Batch.request`
  maps samples to requests, so the model encodes each request once (request-level batching,
  STCA arXiv 2511.06077). A log with one sample per request gives exactly the sample loader.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from longer.errors import InputError, UsageError
from longer.spec import FeatureSpec

from .batch import Batch, hist_key
from .builder import read_meta
from .columns import EventLists, concat_rows, is_list, jagged, normalised, ranges, segment_sums, take_rows

DEFAULT_HISTORY_FEATURES = ("item_id", "category_id", "action")
DEFAULT_CANDIDATE_FEATURES = ("item_id", "category_id")


class SequenceStore:
    """Every user's sorted events as flat numpy arrays: values[offsets[u]:offsets[u+1]]."""

    def __init__(self, data_dir: str | Path, features: Sequence[str], lists: Sequence[str] = ()):
        files = sorted((Path(data_dir) / "sequences").glob("part-*.parquet"))
        cols = ["user_id", *dict.fromkeys([*features, "ts"])]
        users, lengths, values = [], [], {c: [] for c in cols[1:]}
        events: dict[str, list[EventLists]] = {c: [] for c in lists}  # list columns
        for f in files:
            t = pq.read_table(f, columns=cols)
            users.append(t.column("user_id").to_numpy())
            first = t.column(cols[1]).combine_chunks()
            lengths.append(np.diff(first.offsets.to_numpy()))
            for c in cols[1:]:
                flat = t.column(c).combine_chunks().flatten()
                if c in events:
                    events[c].append(EventLists.from_arrow(flat))
                else:
                    values[c].append(flat.to_numpy())
        users = np.concatenate(users) if users else np.zeros(0, np.int64)
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        order = np.argsort(users, kind="stable")
        self.user_ids = users[order]
        if len(self.user_ids) > 1 and (np.diff(self.user_ids) == 0).any():
            raise InputError(f"{data_dir}/sequences: a user appears in two rows; rebuild the dataset")
        # Offsets of the file-order flat arrays, then permuted to user-id order (no value copy).
        file_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.starts = file_offsets[:-1][order]
        self.lengths = lengths[order].astype(np.int64)
        self.values = {
            c: EventLists.concat(events[c])
            if c in events
            else np.concatenate(v)
            if v
            else np.zeros(0, np.int64)
            for c, v in values.items()
        }

    def rows(self, user_id: np.ndarray) -> np.ndarray:
        row = np.searchsorted(self.user_ids, user_id)
        row = np.minimum(row, len(self.user_ids) - 1)
        bad = self.user_ids[row] != user_id if len(self.user_ids) else np.ones(len(user_id), bool)
        if bad.any():
            raise InputError(f"user_id {user_id[bad][0]} has samples but no sequence; rebuild the dataset")
        return row


@dataclass(frozen=True)
class _RowGroup:
    file: Path
    index: int
    rows: int  # rows this loader takes from it
    first_row: int  # row number of its first row within the split (row_id: the split's numbering)
    units: int  # samples, or requests with `requests=True`
    keep: np.ndarray | None = None  # with a ts_range: the positions taken, else every row


def _in_range(ts: np.ndarray, ts_range: tuple[int | None, int | None]) -> np.ndarray:
    """Positions of the samples with lo <= ts < hi (a None bound is open)."""
    lo, hi = ts_range
    mask = np.ones(len(ts), bool)
    if lo is not None:
        mask &= ts >= lo
    if hi is not None:
        mask &= ts < hi
    return np.flatnonzero(mask)


class BatchLoader:
    """Iterate `Batch`es of a dataset split; see the module docstring for the semantics."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        batch_size: int = 512,
        max_len: int | None = None,
        shuffle: bool | None = None,
        seed: int = 0,
        shuffle_window: int = 8,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,  # True: every rank gets the same number of full batches
        history_features: Sequence[str] = DEFAULT_HISTORY_FEATURES,
        candidate_features: Sequence[str] = DEFAULT_CANDIDATE_FEATURES,
        dense_features: Sequence[str] | None = None,
        prefetch: int = 0,
        sequences: SequenceStore | None = None,
        spec: FeatureSpec | None = None,
        ts_range: tuple[int | None, int | None] | None = None,
        requests: bool = False,
    ):
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        if split not in ("train", "eval"):
            raise UsageError(f"split must be 'train' or 'eval', got {split!r}")
        built = self.meta["max_len"]
        max_len = built if max_len is None else max_len
        if not 1 <= max_len <= built:
            raise UsageError(
                f"max_len must be in [1, {built}] (the dataset was built with --max-len {built}), "
                f"got {max_len}"
            )
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if shuffle_window < 1 or prefetch < 0:
            raise UsageError("shuffle_window must be >= 1 and prefetch >= 0")
        user_features, context_features, dense_stats, lists = (), (), {}, ()
        if spec is not None:
            if dense_features is not None:
                raise UsageError("give a spec or dense_features, not both (the spec declares dense columns)")
            spec = spec.resolve(self.meta)
            history_features, candidate_features = spec.history_fields, spec.candidate_keys
            user_features, context_features, dense_features = spec.user, spec.context, spec.dense
            dense_stats, lists = spec.dense_stats, spec.lists
        seq_cols = set(self.meta["columns"]["sequence"]) - {"ts"}
        sample_cols = self.meta["columns"]["sample"]
        for f in history_features:
            if f not in seq_cols:
                raise UsageError(f"history feature {f!r} is not a sequence column (have {sorted(seq_cols)})")
        for kind, names in (
            ("candidate", candidate_features),
            ("user", user_features),
            ("context", context_features),
        ):
            for f in names:
                if f not in sample_cols or f in ("action", "label", "ts", "hist_len"):
                    raise UsageError(f"{kind} feature {f!r} is not an id column of the samples")
        float_cols = self.meta["columns"]["log"]["extra_float"]
        dense_features = float_cols if dense_features is None else list(dense_features)
        for f in dense_features:
            if f not in float_cols:
                raise UsageError(f"dense feature {f!r} is not a float column (have {float_cols})")

        self.split, self.batch_size, self.max_len = split, batch_size, max_len
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.seed, self.shuffle_window = seed, shuffle_window
        self.rank, self.world_size, self.drop_last, self.prefetch = rank, world_size, drop_last, prefetch
        self.requests = requests
        self.history_features = tuple(history_features)
        self.candidate_features = tuple(candidate_features)
        self.dense_features = tuple(dense_features)
        self.sample_features = (*self.candidate_features, "user_id", *user_features, *context_features)
        self.dense_stats, self.lists = dict(dense_stats), tuple(lists)
        self.keys = [hist_key(f) for f in self.history_features] + list(self.sample_features)
        self._columns = list(
            dict.fromkeys(["user_id", "ts", "label", "hist_len", *self.sample_features, *self.dense_features])
        )
        hist_lists = [f for f in self.history_features if f in self.lists]
        self.sequences = sequences or SequenceStore(self.data_dir, self.history_features, hist_lists)
        self.ts_range = tuple(ts_range) if ts_range is not None else None
        self.row_groups: list[_RowGroup] = []
        first = units = 0
        for f in sorted((self.data_dir / split).glob("part-*.parquet")):
            pf = pq.ParquetFile(f)
            for i in range(pf.metadata.num_row_groups):
                n, keep = pf.metadata.row_group(i).num_rows, None
                if n and self.ts_range is not None:
                    keep = _in_range(
                        pf.read_row_group(i, columns=["ts"]).column("ts").to_numpy(), self.ts_range
                    )
                taken = n if keep is None else len(keep)
                if taken:
                    u = taken
                    if requests:  # a ts_range never cuts a request: its samples share one ts
                        key = pf.read_row_group(i, columns=REQUEST_KEY)
                        u = len(_request_starts(key if keep is None else key.take(keep)))
                    self.row_groups.append(_RowGroup(f, i, taken, first, u, keep))
                    units += u
                first += n
        self.num_rows = sum(g.rows for g in self.row_groups)
        self.num_units = units
        self.epoch, self.position = 0, 0
        self._files: dict[Path, pq.ParquetFile] = {}

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the next batch starts. World-size independent (see module docstring)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "split": self.split,
            "requests": self.requests,
        }

    def load_state_dict(self, state: dict) -> None:
        state = {"requests": False} | state  # states written before request units count samples
        for k in ("seed", "num_rows", "split", "requests"):
            if state[k] != getattr(self, k):
                raise InputError(
                    f"loader state is for {k}={state[k]!r}, this loader has {getattr(self, k)!r}"
                )
        if not 0 <= state["position"] <= self.num_units:
            raise InputError(f"loader state position {state['position']} outside [0, {self.num_units}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def rewind(self) -> None:
        """Back to the start of the current epoch (e.g. before another pass over eval data)."""
        self.position = 0

    def rank_samples(self, start: int | None = None) -> int:
        """Units (samples or requests) this rank gets from epoch position `start` (default: the
        current one) to the end."""
        start = self.position if start is None else start
        n = self.num_units - start
        return max(0, (n - self.rank + self.world_size - 1) // self.world_size)

    def __len__(self) -> int:
        if self.drop_last:  # every rank the same number of full batches (synchronous training)
            return (self.num_units - self.position) // (self.world_size * self.batch_size)
        return -(-self.rank_samples() // self.batch_size)

    # --- iteration ----------------------------------------------------------------------------
    def _windows(self, epoch: int) -> list[tuple[list[int], np.random.Generator | None]]:
        n = len(self.row_groups)
        if not self.shuffle:
            return [([i], None) for i in range(n)]
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        return [
            (
                order[w : w + self.shuffle_window].tolist(),
                np.random.default_rng([self.seed, epoch, 1 + w // self.shuffle_window]),
            )
            for w in range(0, n, self.shuffle_window)
        ]

    def _rg(self, g: _RowGroup) -> pa.Table:
        if g.file not in self._files:
            self._files[g.file] = pq.ParquetFile(g.file)
        t = self._files[g.file].read_row_group(g.index, columns=self._columns)
        row_id = np.arange(g.first_row, g.first_row + t.num_rows, dtype=np.int64)
        if g.keep is not None:
            t, row_id = t.take(g.keep), row_id[g.keep]
        return t.append_column("row_id", pa.array(row_id))

    def units(self, epoch: int, start: int = 0) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """This rank's units of the epoch from stream position `start`, window by window:
        (their samples' columns, each unit's number of samples)."""
        w_first = 0
        for groups, rng in self._windows(epoch):
            n = sum(self.row_groups[i].units for i in groups)
            lo, hi = max(w_first, start), w_first + n
            first_pos = lo + (self.rank - (lo - start)) % self.world_size  # first position ≥ lo of this rank
            w_first, local_first = hi, first_pos - (hi - n)
            if first_pos >= hi:
                continue
            tables = [self._rg(self.row_groups[i]) for i in groups]
            t = pa.concat_tables(tables)
            cols = {c: _column(t, c) for c in t.column_names}
            if self.requests:  # unit starts, row group by row group (a request never spans two)
                offsets = np.cumsum([0] + [len(x) for x in tables[:-1]])
                starts = np.concatenate([o + _request_starts(x) for o, x in zip(offsets, tables)])
            else:
                starts = np.arange(len(t), dtype=np.int64)
            sizes = np.diff(np.append(starts, len(t)))
            take = np.arange(local_first, n, self.world_size)
            if rng is not None:
                take = rng.permutation(n)[take]
            rows = ranges(starts[take], sizes[take])
            yield {c: take_rows(v, rows) for c, v in cols.items()}, sizes[take]

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[Batch, int]]:
        """(batch, rank units consumed so far) pairs, carrying units across windows."""
        pending: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
        have, consumed = 0, 0
        full_batches = (self.num_units - start) // (self.world_size * self.batch_size)
        for part in self.units(epoch, start):
            pending.append(part)
            have += len(part[1])
            while have >= self.batch_size:
                if self.drop_last and consumed == full_batches * self.batch_size:
                    return
                cols, sizes = _joined(pending)
                b, rows = self.batch_size, int(sizes[: self.batch_size].sum())
                consumed += b
                yield self.assemble({c: v[:rows] for c, v in cols.items()}, sizes[:b]), consumed
                pending, have = [({c: v[rows:] for c, v in cols.items()}, sizes[b:])], have - b
        if have and not self.drop_last:
            cols, sizes = _joined(pending)
            consumed += have
            yield self.assemble(cols, sizes), consumed

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; afterwards the state points at the next epoch."""
        epoch, start = self.epoch, self.position
        source = self._batches(epoch, start)
        if self.prefetch:
            source = _prefetched(source, self.prefetch)
        for batch, consumed in source:
            self.position = start + consumed * self.world_size
            yield batch
        self.epoch, self.position = epoch + 1, 0

    # --- batch assembly -----------------------------------------------------------------------
    def assemble(self, cols: dict[str, np.ndarray], sizes: np.ndarray | None = None) -> Batch:
        """Join samples to their users' sequences (point in time) and build the KJT. `sizes`:
        samples per request (consecutive rows), whose history is then stored once, on the
        request's first sample; None or all ones: one request per sample."""
        user = cols["user_id"]
        hist_len = cols["hist_len"].astype(np.int64)
        lengths = np.minimum(hist_len, self.max_len)
        request = None
        if sizes is not None and len(sizes) < len(user):
            request = np.repeat(np.arange(len(sizes)), sizes)
            first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            stored = np.zeros_like(lengths)
            stored[first] = lengths[first]
        else:
            stored = lengths
        starts = self.sequences.starts[self.sequences.rows(user)] + hist_len - stored
        events = ranges(starts, stored)  # the batch's history events, request by request
        values, kjt_lengths, event_lengths = [], [], {}
        for f in self.history_features:
            v = self.sequences.values[f]
            if isinstance(v, EventLists):
                flat, per_event = v.take(events)
                values.append(flat)
                kjt_lengths.append(segment_sums(per_event, stored))
                event_lengths[hist_key(f)] = torch.from_numpy(per_event)
            else:
                values.append(v[events])
                kjt_lengths.append(stored)
        ones = np.ones(len(user), np.int64)
        for f in self.sample_features:
            v = cols[f]
            flat, n = jagged(v) if is_list(v) else (v, ones)
            values.append(flat)
            kjt_lengths.append(n)
        dense = {
            f: normalised(cols[f], *self.dense_stats[f])
            if f in self.dense_stats
            else cols[f].astype(np.float32)
            for f in self.dense_features
        }
        return Batch(
            sparse=KeyedJaggedTensor(
                keys=self.keys,
                values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
                lengths=torch.from_numpy(np.concatenate(kjt_lengths)),
            ),
            hist_ts=torch.from_numpy(self.sequences.values["ts"][events]),
            hist_lengths=torch.from_numpy(lengths),
            hist_total=torch.from_numpy(hist_len),
            ts=torch.from_numpy(cols["ts"].astype(np.int64, copy=False)),
            labels=torch.from_numpy(cols["label"].astype(np.float32)),
            row_id=torch.from_numpy(cols["row_id"]),
            dense={f: torch.from_numpy(x) for f, x in dense.items()},
            event_lengths=event_lengths,
            request=None if request is None else torch.from_numpy(request),
        )


REQUEST_KEY = ["user_id", "ts", "hist_len"]  # samples sharing these are one request


def _request_starts(t: pa.Table) -> np.ndarray:
    """Row numbers where a request starts: rows differing from the previous one in REQUEST_KEY."""
    new = np.zeros(len(t), bool)
    new[:1] = True
    for c in REQUEST_KEY:
        v = t.column(c).to_numpy()
        new[1:] |= v[1:] != v[:-1]
    return np.flatnonzero(new)


def _joined(parts: list[tuple[dict[str, np.ndarray], np.ndarray]]) -> tuple[dict, np.ndarray]:
    cols = {c: concat_rows([p[0][c] for p in parts]) for c in parts[0][0]}
    return cols, np.concatenate([p[1] for p in parts])


def _column(t: pa.Table, c: str):
    """A sample column as numpy, or as a ListArray for a list<int64> column."""
    col = t.column(c)
    return col.combine_chunks() if pa.types.is_list(col.type) else col.to_numpy()


def _prefetched(source: Iterator, depth: int) -> Iterator:
    """Run `source` in a background thread (numpy and parquet release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in source:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            q.put(e)

    thread = threading.Thread(target=work, daemon=True, name="longer-loader")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)

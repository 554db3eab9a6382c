"""Offline builder (`longer build`): behaviour log → point-in-time-correct training data.

Output directory (DESIGN.md "Training data"):

    sequences/part-*.parquet  one row per user: user_id + the user's events sorted by
                              (ts, item_id) as list columns item_id, ts, <the spec's sequence
                              columns>, label (default spec: category_id, action)
    train/part-*.parquet      one row per sample (every log row is a sample) with hist_len =
    eval/part-*.parquet       the number of the user's events strictly earlier than its ts
    users/part-*.parquet      one row per user: user_id + the spec's user columns, latest value
    items/part-00000.parquet  one row per item: item_id + the spec's candidate columns, latest value
    meta.json                 counts, split, per-column cardinalities (max_id, distinct), the
                              kind of every feature column (int / list / float), train-split
                              mean and std of every float column, and the spec built with

The feature spec (longer/spec.py, the run config's `[features]`) says which columns are
carried. With `--config`, every declared column must exist with a usable type, or the build
fails with one line naming the column and the file. Without it, the default spec is used and
its columns are carried when the log has them (logs without category_id still build).

User (profile) columns, point in time: a sample's user columns are the values logged on its
own row, i.e. the profile in force when the event was logged; a profile that changes within a
user changes the samples from that row on, never earlier ones (the history rule, with the
row's own second included because the profile was logged with the request). users/ holds each
user's value at its last row in (ts, item_id, label) order: what `longer store load` serves.
items/ holds each item's candidate columns at the item's latest row (ties: the later bucket).

Storage grows with the number of events, never with samples × max_len: a sample's history is
the slice [hist_len - L, hist_len) of its user's sequence, cut by the loader.

Out-of-core: pass 1 streams the log in batches, validates it and hash-partitions users into
buckets (temporary parquet files); pass 2 loads one bucket at a time, sorts it and writes one
part of each output. Peak memory is one bucket (`bucket_rows` events), not the log.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from longer.errors import InputError, MissingInputError, UsageError
from longer.spec import FeatureSpec, SpecError

from .io import atomic_dir
from .schema import LogError, LogSchema, iter_file, scan_log

SCHEMA_VERSION = 2  # 2: users/, items/, list columns, meta features (issue 15)
DAY = 86400
SAMPLE_ROW_GROUP = 1 << 16  # rows per row group of train/ and eval/: the loader's shuffle unit


@dataclass(frozen=True)
class BuildConfig:
    max_len: int
    test_days: float | None = None
    split_ts: int | None = None
    bucket_rows: int = 4_000_000  # events per user bucket (the builder's working set)
    batch_rows: int = 1 << 20

    def __post_init__(self):
        if self.max_len < 1:
            raise UsageError(f"--max-len must be >= 1, got {self.max_len}")
        if self.test_days is not None and self.split_ts is not None:
            raise UsageError("give --test-days or --split-ts, not both")
        if self.test_days is not None and not self.test_days > 0:
            raise UsageError(f"--test-days must be > 0, got {self.test_days}")
        if self.split_ts is not None and self.split_ts < 0:
            raise UsageError(f"--split-ts must be >= 0, got {self.split_ts}")
        if self.bucket_rows < 1 or self.batch_rows < 1:
            raise UsageError("bucket_rows and batch_rows must be >= 1")


def bucket_of(user_id: np.ndarray, n_buckets: int) -> np.ndarray:
    """Stable user → bucket hash (Fibonacci hashing): spreads consecutive ids evenly."""
    h = (user_id.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return (h % np.uint64(n_buckets)).astype(np.int64)


def point_in_time_hist_len(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """For rows sorted by (user, ts, ...): how many of the user's rows have a strictly smaller ts.

    Rows at the same second as a row are never counted in its history (no leakage).
    """
    n = len(user)
    if n == 0:
        return np.zeros(0, np.int64)
    idx = np.arange(n)
    new_user = np.ones(n, bool)
    new_user[1:] = user[1:] != user[:-1]
    new_second = new_user.copy()
    new_second[1:] |= ts[1:] != ts[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))
    second_start = np.maximum.accumulate(np.where(new_second, idx, 0))
    return second_start - user_start


class _Partitioner:
    """Pass 1: route validated batches into per-bucket parquet files, buffering small writes."""

    def __init__(self, tmp: Path, schema: LogSchema, n_buckets: int, flush_rows: int):
        self.tmp, self.schema, self.n, self.flush_rows = tmp, schema.arrow_schema(), n_buckets, flush_rows
        self.buffers: list[list[pa.Table]] = [[] for _ in range(n_buckets)]
        self.buffered = np.zeros(n_buckets, np.int64)
        self.writers: dict[int, pq.ParquetWriter] = {}

    def add(self, table: pa.Table) -> None:
        if self.n == 1:
            return self._append(0, table)
        b = bucket_of(table.column("user_id").to_numpy(), self.n)
        order = np.argsort(b, kind="stable")
        bounds = np.searchsorted(b[order], np.arange(self.n + 1))
        sorted_table = table.take(pa.array(order))
        for k in np.flatnonzero(np.diff(bounds)):
            self._append(int(k), sorted_table.slice(bounds[k], bounds[k + 1] - bounds[k]))

    def _append(self, k: int, part: pa.Table) -> None:
        self.buffers[k].append(part)
        self.buffered[k] += part.num_rows
        if self.buffered[k] >= self.flush_rows:
            self._flush(k)

    def _flush(self, k: int) -> None:
        if not self.buffers[k]:
            return
        if k not in self.writers:
            self.writers[k] = pq.ParquetWriter(self.path(k), self.schema)
        self.writers[k].write_table(pa.concat_tables(self.buffers[k]))
        self.buffers[k], self.buffered[k] = [], 0

    def close(self) -> None:
        for k in range(self.n):
            self._flush(k)
        for w in self.writers.values():
            w.close()

    def path(self, k: int) -> Path:
        return self.tmp / f"bucket-{k:05d}.parquet"


class _Stats:
    def __init__(self):
        self.rows = 0
        self.min_ts, self.max_ts = None, None
        self.max_id: dict[str, int] = {}
        self.distinct: dict[str, np.ndarray] = {}  # distinct values of every id column but user_id
        self.users = 0
        self.dense_sums: dict[str, np.ndarray] = {}  # train rows: [n, Σx, Σx²] per float column
        self.item_last: pa.Table | None = None  # each item's latest row so far (items/): O(items)
        self.hist_len_hist = np.zeros(64, np.int64)  # log2 buckets of hist_len, for meta.json
        self.hist_len_max = 0

    def observe_batch(self, t: pa.Table, id_cols) -> None:
        ts = t.column("ts").to_numpy()
        if len(ts) == 0:
            return
        self.rows += len(ts)
        lo, hi = int(ts.min()), int(ts.max())
        self.min_ts = lo if self.min_ts is None else min(self.min_ts, lo)
        self.max_ts = hi if self.max_ts is None else max(self.max_ts, hi)
        for c in id_cols:
            col = t.column(c).combine_chunks()
            v = (col.flatten() if pa.types.is_list(col.type) else col).to_numpy()
            if len(v):
                self.max_id[c] = max(self.max_id.get(c, -1), int(v.max()))
            else:
                self.max_id.setdefault(c, -1)
            if c != "user_id":
                self.distinct[c] = np.union1d(self.distinct.get(c, np.zeros(0, np.int64)), np.unique(v))

    def observe_train(self, t: pa.Table, float_cols) -> None:
        for c in float_cols:
            x = t.column(c).to_numpy()
            s = self.dense_sums.setdefault(c, np.zeros(3))
            s += [len(x), x.sum(), np.square(x).sum()]

    def dense_stats(self) -> dict:
        out = {}
        for c, (n, s1, s2) in self.dense_sums.items():
            mean = s1 / n if n else 0.0
            out[c] = {"mean": float(mean), "std": float(np.sqrt(max(s2 / n - mean**2, 0.0))) if n else 0.0}
        return out


def carried(schema: LogSchema, spec: FeatureSpec | None, file: Path) -> tuple[FeatureSpec, tuple[str, ...]]:
    """The spec a build uses and its sequences/ columns. An explicit spec is checked against
    the log (LogError naming the column); None is the default spec, cut to the columns present."""
    if spec is None:
        default = FeatureSpec()
        spec = FeatureSpec(
            sequence=tuple(c for c in default.sequence if c in schema.columns),
            candidate=tuple(c for c in default.candidate if c in schema.columns),
        )
    else:
        try:
            spec.check(schema.kinds)
        except SpecError as e:
            raise LogError(file, str(e)) from None
    return spec, ("item_id", "ts", *spec.sequence, "label")


def build(
    log: str | Path,
    out: str | Path,
    cfg: BuildConfig,
    overwrite: bool = False,
    progress: bool = True,
    spec: FeatureSpec | None = None,
) -> dict:
    """Build the dataset directory `out` from the log at `log`. Returns meta.json's content."""
    t0 = time.perf_counter()
    schema, files, total = scan_log(log)
    spec, seq_cols = carried(schema, spec, files[0])
    if total == 0:
        raise LogError(log, "the log holds no rows")
    id_cols = [c for c in ("user_id", "item_id", "category_id", "action") if c in schema.columns]
    id_cols += list(schema.extra_int) + list(schema.extra_list)
    n_buckets = max(1, math.ceil(total / cfg.bucket_rows))
    stats = _Stats()
    with atomic_dir(out, overwrite) as tmp:
        scratch = tmp / "_buckets"
        scratch.mkdir()
        part = _Partitioner(
            scratch, schema, n_buckets, flush_rows=max(8192, cfg.bucket_rows // 8 // n_buckets)
        )
        with tqdm(
            total=total, unit="row", unit_scale=True, desc="build: partition", disable=not progress
        ) as bar:
            for f in files:
                for _, table in iter_file(f, schema, cfg.batch_rows):
                    stats.observe_batch(table, id_cols)
                    part.add(table)
                    bar.update(table.num_rows)
        part.close()

        split_ts = cfg.split_ts
        if split_ts is None:
            days = cfg.test_days if cfg.test_days is not None else 1.0
            split_ts = int(stats.max_ts + 1 - round(days * DAY))
        if split_ts <= stats.min_ts:
            raise LogError(
                log,
                f"split at ts={split_ts} leaves train empty: the log spans [{stats.min_ts}, {stats.max_ts}]",
                column="ts",
            )
        if split_ts > stats.max_ts:
            raise LogError(
                log,
                f"split at ts={split_ts} leaves eval empty: the log spans [{stats.min_ts}, {stats.max_ts}]",
                column="ts",
            )

        for d in ("sequences", "train", "eval", "users", "items"):
            (tmp / d).mkdir()
        counts = {"train": 0, "eval": 0}
        for k in tqdm(range(n_buckets), desc="build: sort+write", unit="bucket", disable=not progress):
            path = part.path(k)
            table = pq.read_table(path) if path.exists() else schema.arrow_schema().empty_table()
            n_train, n_eval = _write_bucket(table, schema, spec, seq_cols, split_ts, tmp, k, stats)
            counts["train"] += n_train
            counts["eval"] += n_eval
            if path.exists():
                path.unlink()
        scratch.rmdir()
        assert stats.item_last is not None
        pq.write_table(stats.item_last.drop_columns(["ts"]), tmp / "items" / "part-00000.parquet")
        meta = _meta(
            log, cfg, schema, spec, seq_cols, stats, split_ts, counts, n_buckets, time.perf_counter() - t0
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _write_bucket(
    table: pa.Table,
    schema: LogSchema,
    spec: FeatureSpec,
    seq_cols: tuple[str, ...],
    split_ts: int,
    tmp: Path,
    k: int,
    stats: _Stats,
) -> tuple[int, int]:
    scalar = [c for c in schema.columns if c not in schema.extra_list]
    cols = {c: table.column(c).to_numpy() for c in scalar}
    # Deterministic total order, whatever the order of rows in the log.
    keys = [cols[c] for c in reversed(("user_id", "ts", "item_id", "label") + schema.optional)]
    order = np.lexsort(keys)
    table = table.take(pa.array(order))
    cols = {c: v[order] for c, v in cols.items()}
    user, ts = cols["user_id"], cols["ts"]
    hist_len = point_in_time_hist_len(user, ts)

    n = len(user)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if n else np.zeros(0, np.int64)
    offsets = pa.array(np.r_[starts, n].astype(np.int32))
    seq = {"user_id": pa.array(user[starts])}
    for c in seq_cols:
        seq[c] = pa.ListArray.from_arrays(offsets, table.column(c).combine_chunks())
    pq.write_table(pa.table(seq), tmp / "sequences" / f"part-{k:05d}.parquet")
    last = pa.array(np.r_[starts[1:], n] - 1 if n else np.zeros(0, np.int64))  # each user's last row
    pq.write_table(table.select(spec.user_keys).take(last), tmp / "users" / f"part-{k:05d}.parquet")
    seen = [stats.item_last] if stats.item_last is not None else []
    stats.item_last = _latest_per_item(
        pa.concat_tables([*seen, table.select(["item_id", "ts", *spec.candidate])])
    )
    stats.users += len(starts)
    if n:
        stats.hist_len_max = max(stats.hist_len_max, int(hist_len.max()))
        np.add.at(stats.hist_len_hist, np.floor(np.log2(hist_len + 1)).astype(np.int64), 1)

    samples = table.append_column("hist_len", pa.array(hist_len.astype(np.int32)))
    is_eval = ts >= split_ts
    counts = []
    for name, mask in (("train", ~is_eval), ("eval", is_eval)):
        part = samples.filter(pa.array(mask))
        if name == "train":
            stats.observe_train(part, schema.extra_float)
        pq.write_table(part, tmp / name / f"part-{k:05d}.parquet", row_group_size=SAMPLE_ROW_GROUP)
        counts.append(int(mask.sum()))
    return counts[0], counts[1]


def _latest_per_item(table: pa.Table) -> pa.Table:
    """Each item's row with the largest ts (ties: the later row), sorted by item_id."""
    item, ts = (table.column(c).to_numpy() for c in ("item_id", "ts"))
    order = np.lexsort((np.arange(len(ts)), ts, item))
    item = item[order]
    is_last = np.r_[item[1:] != item[:-1], True] if len(item) else np.zeros(0, bool)
    return table.take(pa.array(order[is_last]))


def _meta(
    log,
    cfg: BuildConfig,
    schema: LogSchema,
    spec: FeatureSpec,
    seq_cols: tuple[str, ...],
    stats: _Stats,
    split_ts: int,
    counts: dict,
    n_buckets: int,
    seconds: float,
) -> dict:
    cards = {c: {"max_id": v} for c, v in stats.max_id.items()}
    for c, values in stats.distinct.items():
        cards[c]["distinct"] = len(values)
    cards["user_id"]["distinct"] = stats.users
    return {
        "schema_version": SCHEMA_VERSION,
        "log": str(Path(log).resolve()),
        "max_len": cfg.max_len,
        "split": {
            "split_ts": split_ts,
            "test_days": cfg.test_days if cfg.split_ts is None else None,
            "rule": "eval = samples with ts >= split_ts",
        },
        "rows": {"events": stats.rows, "users": stats.users, **counts},
        "ts_range": [stats.min_ts, stats.max_ts],
        "cardinalities": cards,
        "columns": {
            "log": schema.to_json(),
            "sequence": list(seq_cols),
            "sample": list(schema.columns) + ["hist_len"],
            "users": list(spec.user_keys),
            "items": ["item_id", *spec.candidate],
        },
        "features": {
            "spec": spec.to_json(),
            "kinds": schema.kinds,
            "dense_stats": stats.dense_stats(),
            "rule": "dense_stats: mean and std over the train split; std 0 means a constant column",
        },
        "hist_len": {
            "max": stats.hist_len_max,
            "log2_histogram": stats.hist_len_hist[
                : max(1, int(np.flatnonzero(stats.hist_len_hist).max(initial=0)) + 1)
            ].tolist(),
        },
        "build": {"buckets": n_buckets, "seconds": round(seconds, 3)},
    }


def read_meta(data: str | Path) -> dict:
    path = Path(data) / "meta.json"
    if not path.is_file():
        raise MissingInputError(f"{data}: not a dataset directory (no meta.json; run `longer build`)")
    meta = json.loads(path.read_text())
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise InputError(
            f"{path}: schema_version {meta.get('schema_version')} is not the supported "
            f"{SCHEMA_VERSION}; rebuild the dataset with this version of `longer build`"
        )
    return meta


def dataset_spec(meta: dict) -> FeatureSpec:
    """The spec a dataset was built with (meta.json), with its list columns known: what
    `longer store load` lays the online store out by."""
    spec = FeatureSpec.from_json(meta["features"]["spec"])
    kinds = meta["features"].get("kinds", {})
    return dataclasses.replace(spec, lists=tuple(c for c in spec.categorical if kinds.get(c) == "list"))

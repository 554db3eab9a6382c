"""Behaviour-log contract (DESIGN.md "Behaviour log"): reading, validation, normalisation.

A log is a parquet file or a directory of them, one row per logged event. Every batch read
through :func:`iter_log` comes out in canonical form:

    user_id int64, item_id int64, ts int64 (unix seconds), label int8,
    [category_id int64], [action int64], [extra integer columns int64],
    [list columns list<int64>], [float columns float64]

A list column (any list of integers: multi-valued categorical, e.g. a movie's genres) may hold
empty lists but no null list and no null or negative element. Logs without list columns are
read exactly as before.

Bad input is refused with a :class:`LogError` naming the file, the column and a row index
(0-based, counted within that file).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from longer.errors import LongerError

REQUIRED = ("user_id", "item_id", "ts", "label")
OPTIONAL = ("category_id", "action")
# Event columns carried into a user's sequence (DESIGN.md "Training data").
SEQUENCE_COLUMNS = ("item_id", "ts", "category_id", "action", "label")
# A ts above this is year 5138 in seconds: almost surely milliseconds or microseconds.
MAX_TS_SECONDS = 10**11
_INT64_MAX = np.iinfo(np.int64).max
_UNIT_DIVISOR = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}


class LogError(LongerError, ValueError):
    """Input that breaks the behaviour-log contract. The message names file, column and row."""

    def __init__(self, file: str | Path, message: str, column: str | None = None, row: int | None = None):
        self.file, self.column, self.row = str(file), column, row
        where = [str(file)]
        if column is not None:
            where.append(f"column '{column}'")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{': '.join([', '.join(where), message])}")


@dataclass(frozen=True)
class LogSchema:
    """Which contract columns a log has. Every file of a log must have the same ones."""

    optional: tuple[str, ...] = ()  # subset of OPTIONAL, in OPTIONAL order
    extra_int: tuple[str, ...] = ()  # extra categorical features
    extra_list: tuple[str, ...] = ()  # list<int64> categorical features (multi-valued)
    extra_float: tuple[str, ...] = ()  # passed through (e.g. the synthetic log's p_true)
    ignored: tuple[str, ...] = field(default=(), compare=False)  # other types: not part of the contract

    @property
    def columns(self) -> tuple[str, ...]:
        return REQUIRED + self.optional + self.extra_int + self.extra_list + self.extra_float

    @property
    def kinds(self) -> dict[str, str]:
        """Each feature column's kind, as FeatureSpec.check takes it: "int", "list" or "float"."""
        kinds = {c: "int" for c in self.optional + self.extra_int}
        return kinds | {c: "list" for c in self.extra_list} | {c: "float" for c in self.extra_float}

    @property
    def sequence_columns(self) -> tuple[str, ...]:
        return tuple(c for c in SEQUENCE_COLUMNS if c in self.columns)

    def arrow_schema(self) -> pa.Schema:
        types = {"label": pa.int8()} | {c: pa.float64() for c in self.extra_float}
        types |= {c: pa.list_(pa.int64()) for c in self.extra_list}
        return pa.schema([(c, types.get(c, pa.int64())) for c in self.columns])

    def to_json(self) -> dict:
        return {
            "optional": list(self.optional),
            "extra_int": list(self.extra_int),
            "extra_list": list(self.extra_list),
            "extra_float": list(self.extra_float),
            "ignored": list(self.ignored),
        }


def list_log_files(path: str | Path) -> list[Path]:
    """The parquet files of a log: the file itself, or every *.parquet under a directory, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise LogError(p, "no such file or directory")
    files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
    if not files:
        raise LogError(p, "directory holds no *.parquet files")
    return files


def _open(file: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise LogError(file, f"not a readable parquet file ({e})") from e


def schema_of(file: Path, arrow_schema: pa.Schema) -> LogSchema:
    """Check a file's column names and types against the contract (no data is read)."""
    names = arrow_schema.names
    for col in REQUIRED:
        if col not in names:
            raise LogError(file, f"missing required column (columns present: {', '.join(names)})", column=col)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise LogError(file, "duplicate column name", column=dup[0])
    extra_int, extra_list, extra_float, ignored = [], [], [], []
    for name in names:
        if name in REQUIRED or name in OPTIONAL:
            continue
        t = arrow_schema.field(name).type
        if pa.types.is_integer(t):
            extra_int.append(name)
        elif pa.types.is_floating(t):
            extra_float.append(name)
        elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type):
            extra_list.append(name)
        else:
            ignored.append(name)
    return LogSchema(
        tuple(c for c in OPTIONAL if c in names),
        tuple(extra_int),
        tuple(extra_list),
        tuple(extra_float),
        tuple(ignored),
    )


def scan_log(path: str | Path) -> tuple[LogSchema, list[Path], int]:
    """Schema, files and total row count of a log, from parquet metadata only."""
    files = list_log_files(path)
    schema, total = None, 0
    for f in files:
        pf = _open(f)
        s = schema_of(f, pf.schema_arrow)
        total += pf.metadata.num_rows
        if schema is None:
            schema, first = s, f
        elif s != schema:
            for col in sorted(set(s.columns) ^ set(schema.columns)):
                has, lacks = (f, first) if col in s.columns else (first, f)
                raise LogError(
                    lacks,
                    f"column missing here but present in {has}: "
                    "every file of a log must have the same columns",
                    column=col,
                )
    assert schema is not None
    return schema, files, total


def iter_log(path: str | Path, batch_rows: int = 1 << 20) -> Iterator[tuple[Path, pa.Table]]:
    """Yield (file, canonical table) batches of a log, validating every row."""
    schema, files, _ = scan_log(path)
    for f in files:
        yield from iter_file(f, schema, batch_rows)


def iter_file(file: Path, schema: LogSchema, batch_rows: int = 1 << 20) -> Iterator[tuple[Path, pa.Table]]:
    pf = _open(file)
    offset = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(schema.columns)):
            yield file, normalize(pa.Table.from_batches([batch]), schema, file, offset)
            offset += batch.num_rows
    except pa.ArrowException as e:
        raise LogError(file, f"failed to read parquet data ({e})") from e


def read_log(path: str | Path) -> pa.Table:
    """The whole log as one canonical table (for small logs and tests)."""
    schema, files, _ = scan_log(path)
    tables = [t for f in files for _, t in iter_file(f, schema)]
    return pa.concat_tables(tables) if tables else schema.arrow_schema().empty_table()


# --- normalisation ---------------------------------------------------------------------------


def normalize(
    table: pa.Table, schema: LogSchema, file: str | Path = "<table>", row_offset: int = 0
) -> pa.Table:
    """Validate one batch and return it in canonical form (see module docstring)."""
    out = {}
    for col in schema.columns:
        arr = table.column(col).combine_chunks()
        ctx = (file, col, row_offset)
        if col == "ts":
            out[col] = _ts_seconds(arr, *ctx)
        elif col == "label":
            out[col] = _label(arr, *ctx)
        elif col == "action" and (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            out[col] = _hashed_strings(_no_nulls(arr, *ctx))
        elif col in schema.extra_float:
            out[col] = pc.cast(arr, pa.float64())
        elif col in schema.extra_list:
            out[col] = _id_list(arr, *ctx)
        else:
            out[col] = _id(arr, *ctx)
    return pa.table(out, schema=schema.arrow_schema())


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _no_nulls(arr: pa.Array, file, col, off) -> pa.Array:
    if arr.null_count:
        raise LogError(file, "null value", col, off + _first(np.asarray(arr.is_null())))
    return arr


def _id(arr: pa.Array, file, col, off) -> pa.Array:
    """Non-null, non-negative integer id → int64."""
    if not pa.types.is_integer(arr.type):
        raise LogError(file, f"wrong type: expected an integer type, got {arr.type}", col)
    values = _no_nulls(arr, file, col, off).to_numpy(zero_copy_only=False)
    if values.dtype.kind == "i" and len(values) and values.min() < 0:
        raise LogError(file, f"negative id {values[values < 0][0]}", col, off + _first(values < 0))
    if values.dtype == np.uint64 and len(values) and values.max() > _INT64_MAX:
        bad = values > _INT64_MAX
        raise LogError(file, f"id {values[bad][0]} does not fit int64", col, off + _first(bad))
    return pa.array(values.astype(np.int64, copy=False))


def _id_list(arr: pa.Array, file, col, off) -> pa.Array:
    """Non-null lists of non-null, non-negative integer ids → list<int64> (empty lists allowed)."""
    arr = _no_nulls(arr, file, col, off)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    row_of = np.repeat(np.arange(len(arr)), lengths)  # the row of each flattened element
    flat = arr.flatten()
    if flat.null_count:
        bad = np.asarray(flat.is_null())
        raise LogError(file, "null element in a list", col, off + int(row_of[_first(bad)]))
    values = flat.to_numpy(zero_copy_only=False)
    bad = values < 0 if values.dtype.kind == "i" else values > _INT64_MAX
    if bad.any():
        what = "negative id" if values.dtype.kind == "i" else "id that does not fit int64:"
        raise LogError(file, f"{what} {values[bad][0]} in a list", col, off + int(row_of[_first(bad)]))
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))


def _label(arr: pa.Array, file, col, off) -> pa.Array:
    if not (pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type)):
        raise LogError(file, f"wrong type: expected int or bool, got {arr.type}", col)
    values = _no_nulls(arr, file, col, off).to_numpy(zero_copy_only=False)
    bad = (values != 0) & (values != 1)
    if bad.any():
        raise LogError(file, f"label must be 0 or 1, got {values[bad][0]}", col, off + _first(bad))
    return pa.array(values.astype(np.int8))


def _ts_seconds(arr: pa.Array, file, col, off) -> pa.Array:
    """Any timestamp unit, date, ISO-8601 string or int64 unix seconds → int64 seconds."""
    arr = _no_nulls(arr, file, col, off)
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        arr = _parse_ts_strings(arr, file, col, off)
        t = arr.type
    if pa.types.is_timestamp(t):
        raw = arr.cast(pa.int64()).to_numpy()
        secs = np.floor_divide(raw, _UNIT_DIVISOR[t.unit])
    elif pa.types.is_date(t):
        secs = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64()).to_numpy()
    elif pa.types.is_integer(t):
        secs = arr.to_numpy(zero_copy_only=False)
        if secs.dtype == np.uint64 and len(secs) and secs.max() > _INT64_MAX:
            raise LogError(file, "ts does not fit int64", col, off + _first(secs > _INT64_MAX))
        secs = secs.astype(np.int64, copy=False)
        big = secs >= MAX_TS_SECONDS
        if big.any():
            raise LogError(
                file,
                f"ts {secs[big][0]} is not unix seconds (milliseconds? store a parquet "
                "timestamp with its unit, or divide)",
                col,
                off + _first(big),
            )
    else:
        raise LogError(
            file,
            f"wrong type: expected a timestamp, date, ISO-8601 string or int64 unix seconds, got {t}",
            col,
        )
    neg = secs < 0
    if neg.any():
        raise LogError(file, f"negative ts {secs[neg][0]} (before 1970)", col, off + _first(neg))
    return pa.array(secs.astype(np.int64, copy=False))


def _parse_ts_strings(arr: pa.Array, file, col, off) -> pa.Array:
    try:
        return pc.cast(arr, pa.timestamp("s", tz="UTC"))
    except pa.ArrowInvalid:
        pass
    for i, s in enumerate(arr.to_pylist()):  # error path only: find the row
        try:
            pc.cast(pa.array([s]), pa.timestamp("s", tz="UTC"))
        except pa.ArrowInvalid:
            raise LogError(
                file, f"unparseable ts {s!r} (expected ISO-8601, e.g. 2024-05-01T12:00:00Z)", col, off + i
            ) from None
    raise AssertionError("unreachable")


def stable_hash(value: str) -> int:
    """A string's id: the same in every file, process and run (blake2b, 62 bits)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") >> 2


def _hashed_strings(arr: pa.Array) -> pa.Array:
    enc = pc.dictionary_encode(arr)
    codes = np.array([stable_hash(s) for s in enc.dictionary.to_pylist()], dtype=np.int64)
    return pa.array(codes[enc.indices.to_numpy()] if len(codes) else np.zeros(0, np.int64))

"""Importers from public datasets to the behaviour-log contract (`longer import`).

MovieLens (both `ml-latest*` — ratings.csv + movies.csv — and `ml-100k` — u.data + u.item):
    label = rating >= 4, action = int(rating * 2), category_id = the movie's first genre in
    the canonical genre list below (the same ids for both formats).
Taobao UserBehavior.csv (no header: user, item, category, behaviour, unix ts):
    label = behaviour != pv, action = BEHAVIOUR_CODES[behaviour]. Streams the CSV in blocks,
    so the 100M-row file never sits in memory.

Every output batch goes through the log contract's validation before it is written, and the
output directory appears only when the whole import succeeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from tqdm import tqdm

from .io import atomic_dir
from .schema import LogError, LogSchema, normalize

# ml-100k's u.genre order; ml-latest's names map onto it ("Children" = "Children's",
# "(no genres listed)" = "unknown"), IMAX (ml-latest only) is appended.
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
    "IMAX",
)
GENRE_ALIASES = {"Children": "Children's", "(no genres listed)": "unknown"}
BEHAVIOUR_CODES = {"pv": 1, "fav": 2, "cart": 3, "buy": 4}
LOG_SCHEMA = LogSchema(optional=("category_id", "action"))


def genre_id(name: str) -> int:
    name = GENRE_ALIASES.get(name, name)
    if name not in GENRES:
        raise KeyError(name)
    return GENRES.index(name)


def _write(tables, out: Path, overwrite: bool, progress_total: int | None, desc: str) -> dict:
    rows = 0
    with (
        atomic_dir(out, overwrite) as tmp,
        tqdm(
            total=progress_total, unit="row", unit_scale=True, desc=desc, disable=progress_total is None
        ) as bar,
        pq.ParquetWriter(tmp / "part-00000.parquet", LOG_SCHEMA.arrow_schema()) as w,
    ):
        for t in tables:
            w.write_table(t)
            rows += t.num_rows
            bar.update(t.num_rows)
    return {"out": str(out), "rows": rows}


def _ratings_to_log(src: Path, user, item, rating, ts, category) -> pa.Table:
    r = rating.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~np.isfinite(r) | (r < 0) | (r > 5)
    if bad.any():
        raise LogError(src, f"rating {r[bad][0]} outside [0, 5]", "rating", int(np.flatnonzero(bad)[0]))
    t = pa.table(
        {
            "user_id": user,
            "item_id": item,
            "ts": ts,
            "label": pa.array((r >= 4).astype(np.int8)),
            "category_id": category,
            "action": pa.array(np.rint(r * 2).astype(np.int64)),
        }
    )
    return normalize(t, LOG_SCHEMA, src)


def _category(src: Path, item_ids: pa.Array, genre_of: dict[int, int]) -> pa.Array:
    ids = item_ids.to_numpy(zero_copy_only=False)
    keys = np.fromiter(genre_of.keys(), np.int64, len(genre_of))
    vals = np.fromiter(genre_of.values(), np.int64, len(genre_of))
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys[order], ids), 0, max(len(keys) - 1, 0))
    missing = keys[order][pos] != ids if len(keys) else np.ones(len(ids), bool)
    if missing.any():
        raise LogError(
            src,
            f"movie {ids[missing][0]} is rated but not listed in the movies file",
            "item",
            int(np.flatnonzero(missing)[0]),
        )
    return pa.array(vals[order][pos])


def _read_csv(path: Path, **kw) -> pa.Table:
    if not path.is_file():
        raise LogError(path, "missing file")
    try:
        return pcsv.read_csv(path, **kw)
    except pa.ArrowInvalid as e:
        raise LogError(path, f"unreadable CSV ({e})") from e


def import_movielens(
    src: str | Path, out: str | Path, overwrite: bool = False, progress: bool = True
) -> dict:
    src = Path(src)
    if (src / "ratings.csv").is_file():
        table = _movielens_latest(src)
        fmt = "ml-latest"
    elif (src / "u.data").is_file():
        table = _movielens_100k(src)
        fmt = "ml-100k"
    else:
        raise LogError(
            src,
            "not a MovieLens directory: expected ratings.csv + movies.csv (ml-latest*) "
            "or u.data + u.item (ml-100k)",
        )
    return {
        **_write([table], Path(out), overwrite, table.num_rows if progress else None, "import"),
        "format": fmt,
    }


def _movielens_latest(src: Path) -> pa.Table:
    movies = _read_csv(
        src / "movies.csv",
        convert_options=pcsv.ConvertOptions(
            column_types={"movieId": pa.int64(), "genres": pa.string()}, include_columns=["movieId", "genres"]
        ),
    )
    genre_of = {}
    for row, (mid, genres) in enumerate(zip(movies["movieId"].to_pylist(), movies["genres"].to_pylist())):
        first = (genres or "(no genres listed)").split("|")[0]
        try:
            genre_of[mid] = genre_id(first)
        except KeyError:
            raise LogError(src / "movies.csv", f"unknown genre {first!r}", "genres", row) from None
    r = _read_csv(
        src / "ratings.csv",
        convert_options=pcsv.ConvertOptions(
            column_types={
                "userId": pa.int64(),
                "movieId": pa.int64(),
                "rating": pa.float64(),
                "timestamp": pa.int64(),
            }
        ),
    )
    for c in ("userId", "movieId", "rating", "timestamp"):
        if c not in r.column_names:
            raise LogError(src / "ratings.csv", "missing column", c)
    f = src / "ratings.csv"
    return _ratings_to_log(
        f, r["userId"], r["movieId"], r["rating"], r["timestamp"], _category(f, r["movieId"], genre_of)
    )


def _movielens_100k(src: Path) -> pa.Table:
    n_genres = 19
    names = ["movie_id", "title", "release", "video_release", "url"] + [f"g{i}" for i in range(n_genres)]
    items = _read_csv(
        src / "u.item",
        read_options=pcsv.ReadOptions(column_names=names, encoding="latin1"),
        parse_options=pcsv.ParseOptions(delimiter="|", quote_char=False),
        convert_options=pcsv.ConvertOptions(include_columns=["movie_id"] + names[5:]),
    )
    flags = np.stack([items[f"g{i}"].to_numpy(zero_copy_only=False) for i in range(n_genres)], axis=1)
    first = np.where(flags.any(axis=1), flags.argmax(axis=1), 0)  # u.genre index == GENRES index
    genre_of = dict(zip(items["movie_id"].to_pylist(), first.tolist()))
    f = src / "u.data"
    r = _read_csv(
        f,
        read_options=pcsv.ReadOptions(column_names=["user", "item", "rating", "ts"]),
        parse_options=pcsv.ParseOptions(delimiter="\t"),
        convert_options=pcsv.ConvertOptions(
            column_types={"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(), "ts": pa.int64()}
        ),
    )
    return _ratings_to_log(f, r["user"], r["item"], r["rating"], r["ts"], _category(f, r["item"], genre_of))


TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behaviour", "ts")


def csv_problem(path: Path, columns: tuple[str, ...], text_columns: tuple[str, ...] = ()) -> str:
    """Where a headerless CSV first breaks its layout, for an error message: "line N: ..."
    (1-based; read again line by line, only once a block reader has failed)."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != len(columns):
                return f"line {line}: expected {len(columns)} columns, got {len(row)}"
            for name, value in zip(columns, row):
                if name not in text_columns and not value.strip().lstrip("-").isdigit():
                    return f"line {line}, column '{name}': {value[:40]!r} is not an integer"
    return "unreadable CSV"


def import_taobao(
    src: str | Path,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    block_size: int = 64 << 20,
) -> dict:
    src = Path(src)
    if src.is_dir():
        src = src / "UserBehavior.csv"
    if not src.is_file():
        raise LogError(src, "missing file (expected Tianchi UserBehavior.csv)")

    def unreadable(e: Exception) -> LogError:
        return LogError(
            src, f"{csv_problem(src, TAOBAO_COLUMNS, ('behaviour',))} ({str(e).splitlines()[0][:120]})"
        )

    try:
        reader = pcsv.open_csv(
            src,
            read_options=pcsv.ReadOptions(column_names=list(TAOBAO_COLUMNS), block_size=block_size),
            convert_options=pcsv.ConvertOptions(
                column_types={
                    "user_id": pa.int64(),
                    "item_id": pa.int64(),
                    "category_id": pa.int64(),
                    "behaviour": pa.string(),
                    "ts": pa.int64(),
                }
            ),
        )
    except pa.ArrowInvalid as e:
        raise unreadable(e) from e
    total = src.stat().st_size

    def batches():
        offset = 0
        try:
            for rb in reader:
                beh = rb.column("behaviour")
                code = pc.index_in(beh, value_set=pa.array(list(BEHAVIOUR_CODES)))
                if code.null_count:
                    row = int(np.flatnonzero(np.asarray(code.is_null()))[0])
                    raise LogError(
                        src,
                        f"unknown behaviour {beh[row].as_py()!r} (expected one of "
                        f"{', '.join(BEHAVIOUR_CODES)})",
                        "behaviour",
                        offset + row,
                    )
                action = np.asarray(list(BEHAVIOUR_CODES.values()), np.int64)[
                    code.to_numpy(zero_copy_only=False)
                ]
                t = pa.table(
                    {
                        "user_id": rb.column("user_id"),
                        "item_id": rb.column("item_id"),
                        "ts": rb.column("ts"),
                        "label": pa.array((action != 1).astype(np.int8)),
                        "category_id": rb.column("category_id"),
                        "action": pa.array(action),
                    }
                )
                yield normalize(t, LOG_SCHEMA, src, offset)
                offset += rb.num_rows
        except pa.ArrowInvalid as e:
            raise unreadable(e) from e

    return {**_write(batches(), Path(out), overwrite, None, "import"), "format": "taobao", "bytes": total}

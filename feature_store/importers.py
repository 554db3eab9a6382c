"""Importers from public datasets to the behaviour-log contract (`longer import`).

MovieLens (both `ml-latest*` — ratings.csv + movies.csv — and `ml-100k` — u.data + u.item +
u.user):
    label = rating >= 4, action = int(rating * 2), category_id = the movie's first genre in
    the canonical genre list below (the same ids for both formats).
    Item columns (both): genres list<int64> = every genre of the movie (GENRES ids; none listed:
    [0], "unknown"), year = release year (ml-100k: of the release date; ml-latest: the "(YYYY)"
    ending the title; 0 when absent).
    User profile columns (ml-100k, from u.user; constant per user):
        age_bucket  the MovieLens-1M age codes: 1 (<18), 18, 25, 35, 45, 50, 56 (56+)
        gender      1 = M, 2 = F
        occupation  1 + the index in OCCUPATIONS (ml-100k's u.occupation)
        zip_prefix  1 + the zip code's first three digits; 0 for a non-US (non-numeric) code
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
ML_LATEST_SCHEMA = LogSchema(optional=("category_id", "action"), extra_int=("year",), extra_list=("genres",))
ML_100K_SCHEMA = LogSchema(
    optional=("category_id", "action"),
    extra_int=("age_bucket", "gender", "occupation", "zip_prefix", "year"),
    extra_list=("genres",),
)
OCCUPATIONS = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)
AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)  # lower bounds (1: under 18)
GENDERS = {"M": 1, "F": 2}


def genre_id(name: str) -> int:
    name = GENRE_ALIASES.get(name, name)
    if name not in GENRES:
        raise KeyError(name)
    return GENRES.index(name)


def _write(
    tables, out: Path, overwrite: bool, progress_total: int | None, desc: str, schema: LogSchema = LOG_SCHEMA
) -> dict:
    rows = 0
    with (
        atomic_dir(out, overwrite) as tmp,
        tqdm(
            total=progress_total, unit="row", unit_scale=True, desc=desc, disable=progress_total is None
        ) as bar,
        pq.ParquetWriter(tmp / "part-00000.parquet", schema.arrow_schema()) as w,
    ):
        for t in tables:
            w.write_table(t)
            rows += t.num_rows
            bar.update(t.num_rows)
    return {"out": str(out), "rows": rows}


def _ratings_to_log(src: Path, schema: LogSchema, user, item, rating, ts, **columns) -> pa.Table:
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
            "action": pa.array(np.rint(r * 2).astype(np.int64)),
            **columns,
        }
    )
    return normalize(t, schema, src)


def _rows_of(src: Path, ids: pa.Array, keys: np.ndarray, message: str, column: str) -> np.ndarray:
    """For each rated id, its row in a side table with these `keys` (LogError if it has none;
    `message` formats the first missing id)."""
    ids = ids.to_numpy(zero_copy_only=False)
    order = np.argsort(keys, kind="stable")
    pos = np.clip(np.searchsorted(keys[order], ids), 0, max(len(keys) - 1, 0))
    missing = keys[order][pos] != ids if len(keys) else np.ones(len(ids), bool)
    if missing.any():
        raise LogError(src, message.format(ids[missing][0]), column, _first(missing))
    return order[pos]


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _item_columns(src: Path, ids: pa.Array, movie_ids, genres: list[list[int]], years) -> dict:
    """category_id, genres and year of every rated movie, from the movies table."""
    keys = np.asarray(movie_ids, np.int64)
    rows = pa.array(_rows_of(src, ids, keys, "movie {} is rated but not listed in the movies file", "item"))
    genres = pa.array([g or [0] for g in genres], pa.list_(pa.int64()))
    first = pc.list_element(genres, 0)
    return {
        "category_id": first.take(rows),
        "genres": genres.take(rows),
        "year": pa.array(np.asarray(years, np.int64)).take(rows),
    }


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
        table, schema, fmt = _movielens_latest(src), ML_LATEST_SCHEMA, "ml-latest"
    elif (src / "u.data").is_file():
        table, schema, fmt = _movielens_100k(src), ML_100K_SCHEMA, "ml-100k"
    else:
        raise LogError(
            src,
            "not a MovieLens directory: expected ratings.csv + movies.csv (ml-latest*) "
            "or u.data + u.item + u.user (ml-100k)",
        )
    total = table.num_rows if progress else None
    return {**_write([table], Path(out), overwrite, total, "import", schema), "format": fmt}


def _movielens_latest(src: Path) -> pa.Table:
    movies = _read_csv(
        src / "movies.csv",
        convert_options=pcsv.ConvertOptions(
            column_types={"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()},
            include_columns=["movieId", "title", "genres"],
        ),
    )
    genres = []
    for row, names in enumerate(movies["genres"].to_pylist()):
        try:
            genres.append([genre_id(g) for g in (names or "(no genres listed)").split("|")])
        except KeyError as e:
            raise LogError(src / "movies.csv", f"unknown genre {e.args[0]!r}", "genres", row) from None
    years = [_title_year(t or "") for t in movies["title"].to_pylist()]
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
    items = _item_columns(f, r["movieId"], movies["movieId"].to_numpy(), genres, years)
    return _ratings_to_log(
        f, ML_LATEST_SCHEMA, r["userId"], r["movieId"], r["rating"], r["timestamp"], **items
    )


def _title_year(title: str) -> int:
    """1995 from "Toy Story (1995)"; 0 when the title ends without a year."""
    t = title.strip()
    return int(t[-5:-1]) if len(t) >= 6 and t[-6] == "(" and t[-1] == ")" and t[-5:-1].isdigit() else 0


def _movielens_100k(src: Path) -> pa.Table:
    n_genres = 19
    names = ["movie_id", "title", "release", "video_release", "url"] + [f"g{i}" for i in range(n_genres)]
    items = _read_csv(
        src / "u.item",
        read_options=pcsv.ReadOptions(column_names=names, encoding="latin1"),
        parse_options=pcsv.ParseOptions(delimiter="|", quote_char=False),
        convert_options=pcsv.ConvertOptions(
            column_types={"release": pa.string()}, include_columns=["movie_id", "release"] + names[5:]
        ),
    )
    flags = np.stack([items[f"g{i}"].to_numpy(zero_copy_only=False) for i in range(n_genres)], axis=1)
    genres = [np.flatnonzero(f).tolist() for f in flags]  # u.genre index == GENRES index
    years = [int(d[-4:]) if d and d[-4:].isdigit() else 0 for d in items["release"].to_pylist()]
    f = src / "u.data"
    r = _read_csv(
        f,
        read_options=pcsv.ReadOptions(column_names=["user", "item", "rating", "ts"]),
        parse_options=pcsv.ParseOptions(delimiter="\t"),
        convert_options=pcsv.ConvertOptions(
            column_types={"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(), "ts": pa.int64()}
        ),
    )
    cols = _item_columns(f, r["item"], items["movie_id"].to_numpy(), genres, years)
    user_ids, profile = _ml100k_users(src / "u.user")
    rows = pa.array(_rows_of(f, r["user"], user_ids, "user {} rated but is not listed in u.user", "user"))
    cols |= {c: pa.array(v).take(rows) for c, v in profile.items()}
    return _ratings_to_log(f, ML_100K_SCHEMA, r["user"], r["item"], r["rating"], r["ts"], **cols)


def _ml100k_users(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """u.user (user id | age | gender | occupation | zip code) → ids and profile columns."""
    names = ["user", "age", "gender", "occupation", "zip"]
    t = _read_csv(
        path,
        read_options=pcsv.ReadOptions(column_names=names, encoding="latin1"),
        parse_options=pcsv.ParseOptions(delimiter="|", quote_char=False),
        convert_options=pcsv.ConvertOptions(
            column_types={"user": pa.int64(), "age": pa.int64(), **{c: pa.string() for c in names[2:]}}
        ),
    )
    age = t["age"].to_numpy(zero_copy_only=False)
    profile = {
        "age_bucket": np.asarray(AGE_BUCKETS)[(np.searchsorted(AGE_BUCKETS, age, side="right") - 1).clip(0)],
        "gender": _codes(path, t["gender"].to_pylist(), GENDERS, "gender"),
        "occupation": _codes(
            path, t["occupation"].to_pylist(), {o: i + 1 for i, o in enumerate(OCCUPATIONS)}, "occupation"
        ),
        "zip_prefix": np.array(
            [int(z[:3]) + 1 if z[:3].isdigit() else 0 for z in t["zip"].to_pylist()], np.int64
        ),
    }
    return t["user"].to_numpy(), profile


def _codes(path: Path, values: list, codes: dict[str, int], column: str) -> np.ndarray:
    for row, v in enumerate(values):
        if v not in codes:
            raise LogError(path, f"unknown {column} {v!r} (expected one of {', '.join(codes)})", column, row)
    return np.array([codes[v] for v in values], np.int64)


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

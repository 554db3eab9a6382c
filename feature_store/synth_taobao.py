"""A synthetic log in Taobao UserBehavior's shape (`longer synth --format taobao`): the CSV that
`longer import taobao` reads, so the importer and the hashing regime (ids far larger than the
embedding tables) are exercised without the 100M-row original.

The events come from `feature_store.synth` (planted long- and short-term signal, power-law
item popularity) and are dressed as Tianchi UserBehavior.csv (no header):

    user,item,category,behavior,ts        e.g.  817296,3042734,4756105,pv,1511658000

* ids in the millions: users, items and categories are mapped one to one onto random ids in
  [1, 1,018,012), [1, 5,163,071) and [1, 5,162,430) (the ranges of the real file);
* many categories: `categories` defaults to items // 50 (Taobao: ~9.4k categories, ~4.2M items);
* behaviour: a negative is `pv`; a positive is `cart`, `fav` or `buy` (0.5 / 0.3 / 0.2, the
  real file's mix among non-pv rows), about 10 % positives (label_bias −3.9);
* time: the real file's nine days from 2017-11-25 00:00 (UTC+8).

Written atomically: OUT/UserBehavior.csv appears only when complete.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from longer.errors import UsageError

from .io import atomic_dir
from .synth import T0, SynthConfig, synthesize

TAOBAO_T0 = 1_511_539_200  # 2017-11-25 00:00 UTC+8
ID_RANGES = {"user_id": 1_018_012, "item_id": 5_163_071, "category_id": 5_162_430}
POSITIVE = (("cart", 0.5), ("fav", 0.3), ("buy", 0.2))
LABEL_BIAS = -3.9  # ~10 % positives with the synth's planted effects (measured: 9.8–10.3 %)


def taobao_config(
    users: int, items: int, events_per_user: int, seed: int = 0, categories: int = 0
) -> SynthConfig:
    return SynthConfig(
        users=users,
        items=items,
        events_per_user=events_per_user,
        seed=seed,
        categories=categories or max(8, items // 50),
        days=9,
        label_bias=LABEL_BIAS,
    )


def _id_maps(cfg: SynthConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Synth id (1-based) → a distinct random id below the real file's maximum."""
    n = {"user_id": cfg.users, "item_id": cfg.items, "category_id": cfg.n_categories}
    for col, count in n.items():
        if count >= ID_RANGES[col]:
            raise UsageError(f"{count} {col.split('_')[0]}s exceed Taobao's id range ({ID_RANGES[col]:,})")
    return {c: np.r_[0, rng.choice(np.arange(1, ID_RANGES[c]), n[c], replace=False)] for c in n}


def _dress(t: pa.Table, maps: dict[str, np.ndarray], rng: np.random.Generator) -> pa.Table:
    label = t.column("label").to_numpy()
    names = np.array(["pv", *(b for b, _ in POSITIVE)])
    kind = 1 + rng.choice(len(POSITIVE), len(label), p=[p for _, p in POSITIVE])
    return pa.table(
        {
            "user": maps["user_id"][t.column("user_id").to_numpy()],
            "item": maps["item_id"][t.column("item_id").to_numpy()],
            "category": maps["category_id"][t.column("category_id").to_numpy()],
            "behavior": names[np.where(label == 1, kind, 0)],
            "ts": t.column("ts").to_numpy() - T0 + TAOBAO_T0,
        }
    )


def synthesize_taobao(
    cfg: SynthConfig, out: str | Path, overwrite: bool = False, progress: bool = True
) -> dict:
    """Write OUT/UserBehavior.csv; returns a summary (rows, positives share, distinct ids)."""
    rng = np.random.default_rng([cfg.seed, 1])  # not the event stream's
    maps = _id_maps(cfg, rng)
    rows = positives = 0
    with atomic_dir(out, overwrite) as tmp, tempfile.TemporaryDirectory(dir=tmp) as work:
        synthesize(cfg, Path(work) / "log", progress=progress)
        with pcsv.CSVWriter(
            tmp / "UserBehavior.csv",
            pa.schema(
                [
                    ("user", pa.int64()),
                    ("item", pa.int64()),
                    ("category", pa.int64()),
                    ("behavior", pa.string()),
                    ("ts", pa.int64()),
                ]
            ),
            write_options=pcsv.WriteOptions(include_header=False, quoting_style="none"),
        ) as w:
            for part in sorted((Path(work) / "log").glob("part-*.parquet")):
                for batch in pq.ParquetFile(part).iter_batches(
                    columns=["user_id", "item_id", "category_id", "ts", "label"]
                ):
                    t = _dress(pa.Table.from_batches([batch]), maps, rng)
                    w.write_table(t)
                    rows += t.num_rows
                    positives += int((t.column("behavior").to_numpy(zero_copy_only=False) != "pv").sum())
    return {
        "out": str(Path(out) / "UserBehavior.csv"),
        "format": "taobao",
        "rows": rows,
        "positive_share": round(positives / max(rows, 1), 4),
        "users": cfg.users,
        "items": cfg.items,
        "categories": cfg.n_categories,
        "seed": cfg.seed,
    }

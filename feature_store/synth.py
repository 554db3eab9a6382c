"""Synthetic behaviour log with planted long-term and short-term signal (`longer synth`).

Generative process (all draws from one seeded numpy Generator, users generated in chunks so
memory stays bounded by the chunk, not the log):

World
  * M items in C categories (balanced, random assignment). Item popularity is a power law:
    a random permutation gives every item a global rank r, P(r) ∝ (r+1)^-a with a = 1.1.
  * Item quality q_i ~ N(0, 0.5²): a user-independent effect an item-id embedding can learn.

User u (about K events, K·exp(N(0, 0.3²)) clipped to [K/2, 2K])
  * Long-term interests: two distinct categories LT_u, stable for the user's whole life.
  * Short-term drift: the event stream is cut into segments (a new one starts with
    probability 1/30 per event); each segment has a drift category D drawn uniformly.
  * Exposure: each event shows an item drawn from one of three sources:
        source        early life (first half of u's events)   late life (second half)
        long-term     0.40  (a category from LT_u)             0.06
        drift         0.20  (the segment's D)                  0.30
        popular       0.40  (global power law)                 0.64
    Within a category, items follow the same power law over their global ranks.
  * Label: p_true = sigmoid(b + q_i + 3.0·[cat_i ∈ LT_u] + 1.5·[cat_i = D]),
    label ~ Bernoulli(p_true), b = label_bias (−1.2). The log carries p_true so a test can
    compute the oracle AUC.
  * action: 1 = view (label 0); 2 = click or 3 = purchase (label 1, purchase w.p. 0.25).
    A user's past actions reveal past labels, which is what a history model learns from.
  * Time: users start uniformly in the first half of a `days`-long window and stay active to
    its end. Gaps: 25% exactly 0 (same-second events: the builder's tie handling matters),
    60% in-session gaps ~ Exp(60 s), 15% session breaks, scaled to fill the user's span.

Requests (`--impressions-per-request k`, default 1): a user's events are cut into runs of k
consecutive impressions shown at one request, all carrying the run's first timestamp (so
they share hist_len: none sees the others); everything else is drawn as above, with no extra
random draws, so k = 1 is the default log. Such a log is what request-level batching (RLB,
`train.rlb`) encodes once per request.

Long range (`--long-range`): a log a CPU budget can learn, whose clicks depend on behaviour
hundreds to thousands of events back, with the short-term signal removed:
  * Early life (the first LR_EARLY = 25% of a user's events): 60% of exposures come from the
    two long-term categories LT_u, 40% from the popular distribution.
  * Late life: only LR_LATE = 3% from LT_u (about 1.5 of the last 50 events), 97% popular; no
    drift segments. The platform has stopped showing the old interest; the user has not lost it.
  * Label: p_true = sigmoid(-1.5 + q_i + b_cat + 3.0·[cat_i ∈ LT_u]), b_cat ~ N(0, 0.5²) a
    simple per-category effect (its own Generator). Item and category effects are learnable
    from counts; the LT effect only from the early-life clicks, which a late sample at event
    index p sees only with L ≥ p - 0.25·n_u: quality should rise with L up to ~2n_u.
  Each row carries p_true, so the oracle AUC is the ceiling; tests/test_synth_long_range.py
  checks that full-history counts beat the last 50 events by a wide margin.

Extra columns (`--extra-columns`, for tests of declared features; no signal, drawn from a
second Generator so the default log is unchanged): `tier` (user profile, int: 1 for the first
half of a user's events, 2 after: a profile that changes mid-log), `brand` (item column, int,
fixed per item), `device` (request context, int in 1..3 per event), `price` (dense float, fixed
per item) and `tags` (list<int64>: 1 to 3 tag ids per item, fixed per item).

Why length matters: late in a user's life, the long-term categories are rarely shown (6%) but
still clicked with high probability, and the evidence for them lies mostly in the first half
of the history, hundreds of events back. A model that sees the last 50 events sees the drift
(short-term signal) and a couple of long-term events at most; one that sees 1,000+ sees the
early-life clicks that reveal LT_u. `tests/test_synth.py` checks this with count features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from longer.errors import UsageError

from .io import atomic_dir

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z
ZIPF_A = 1.1
LR_EARLY, LR_EARLY_LT, LR_LATE = 0.25, 0.60, 0.03  # --long-range exposure (module docstring)


@dataclass(frozen=True)
class SynthConfig:
    users: int
    items: int
    events_per_user: int
    seed: int = 0
    categories: int = 0  # 0: min(200, max(8, items // 20))
    days: int = 60
    chunk_events: int = 2_000_000  # working-set bound: events generated and written at a time
    rows_per_file: int = 5_000_000
    label_bias: float = -1.2  # the label logit's intercept: sets the positive rate (Taobao-like: lower)
    extra_columns: bool = False  # add tier, brand, device, price, tags (module docstring)
    impressions_per_request: int = 1  # events per request, sharing one ts (module docstring)
    long_range: bool = False  # the long-range log (module docstring)

    def __post_init__(self):
        names = ("users", "items", "events_per_user", "days", "chunk_events", "rows_per_file")
        for name in (*names, "impressions_per_request"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.events_per_user < 2:
            raise UsageError("--events-per-user must be >= 2")
        if self.items < 2:
            raise UsageError("--items must be >= 2")
        if self.categories < 0 or self.categories > self.items:
            raise UsageError(f"--categories must be in [0, items], got {self.categories}")

    @property
    def n_categories(self) -> int:
        return self.categories or min(200, max(8, self.items // 20), self.items)


def _zipf_rank(rng: np.random.Generator, n: np.ndarray, a: float = ZIPF_A) -> np.ndarray:
    """Ranks in [0, n) with P(r) ≈ ∝ (r+1)^-a (inverse CDF of the continuous power law)."""
    u = rng.random(len(n))
    b = 1.0 - a
    x = (1.0 + u * ((n + 1.0) ** b - 1.0)) ** (1.0 / b)
    return np.minimum(np.floor(x).astype(np.int64) - 1, n - 1).clip(0)


class _World:
    def __init__(self, cfg: SynthConfig, rng: np.random.Generator):
        m, c = cfg.items, cfg.n_categories
        self.n_cat = c
        self.item_cat = np.empty(m, np.int64)
        self.item_cat[rng.permutation(m)] = np.arange(m) % c
        self.quality = rng.normal(0.0, 0.5, m)
        self.by_rank = rng.permutation(m)  # by_rank[r] = item with global popularity rank r
        rank = np.empty(m, np.int64)
        rank[self.by_rank] = np.arange(m)
        self.cat_items = np.lexsort((rank, self.item_cat))  # items by (category, rank)
        self.cat_size = np.bincount(self.item_cat, minlength=c)
        self.cat_start = np.concatenate([[0], np.cumsum(self.cat_size)[:-1]])
        # --long-range's category effect, from its own Generator (the default log is unchanged)
        self.cat_effect = np.random.default_rng([cfg.seed, 2]).normal(0.0, 0.5, c)

    def item_in(self, rng, cats: np.ndarray) -> np.ndarray:
        return self.cat_items[self.cat_start[cats] + _zipf_rank(rng, self.cat_size[cats])]

    def popular(self, rng, n: int) -> np.ndarray:
        return self.by_rank[_zipf_rank(rng, np.full(n, len(self.by_rank)))]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class _Extras:
    """Per-item side columns of `--extra-columns`, from their own Generator."""

    def __init__(self, cfg: SynthConfig):
        self.rng = np.random.default_rng([cfg.seed, 1])
        m = cfg.items
        self.brand = self.rng.integers(1, max(2, m // 10) + 1, m)
        self.price = np.round(self.rng.lognormal(2.0, 0.5, m), 2)
        n_tags = self.rng.integers(1, 4, m)
        self.tag_offsets = np.r_[0, np.cumsum(n_tags)]
        self.tags = self.rng.integers(1, 64, int(n_tags.sum()))

    def columns(self, item: np.ndarray, early: np.ndarray) -> dict:
        lengths = np.diff(self.tag_offsets)[item]
        offsets = np.r_[0, np.cumsum(lengths)]  # of each event's tag list in the output
        flat = self.tags[np.repeat(self.tag_offsets[item] - offsets[:-1], lengths) + np.arange(offsets[-1])]
        return {
            "tier": np.where(early, 1, 2).astype(np.int64),
            "brand": self.brand[item].astype(np.int64),
            "device": self.rng.integers(1, 4, len(item)).astype(np.int64),
            "price": self.price[item],
            "tags": pa.ListArray.from_arrays(
                pa.array(offsets.astype(np.int32)), pa.array(flat.astype(np.int64))
            ),
        }


def _chunk(
    cfg: SynthConfig,
    world: _World,
    rng: np.random.Generator,
    first_user: int,
    n_users: int,
    extras: _Extras | None = None,
) -> pa.Table:
    k = cfg.events_per_user
    n = np.clip(np.round(k * np.exp(rng.normal(0, 0.3, n_users))), max(2, k // 2), 2 * k).astype(np.int64)
    user = np.repeat(np.arange(n_users), n)
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    e = np.arange(len(user)) - start[user]  # event index within the user
    early = e < n[user] // 2

    c = world.n_cat
    lt1 = rng.integers(c, size=n_users)
    lt2 = (lt1 + 1 + rng.integers(max(c - 1, 1), size=n_users)) % c
    seg = np.cumsum((e == 0) | (rng.random(len(e)) < 1 / 30)) - 1
    drift = rng.integers(c, size=seg[-1] + 1)[seg]

    r = rng.random(len(e))
    if cfg.long_range:
        early = e < np.ceil(n[user] * LR_EARLY)
        p_long, p_drift = np.where(early, LR_EARLY_LT, LR_LATE), np.zeros(len(e))
    else:
        p_long = np.where(early, 0.40, 0.06)
        p_drift = np.where(early, 0.20, 0.30)
    src_long = r < p_long
    src_drift = ~src_long & (r < p_long + p_drift)
    item = world.popular(rng, len(e))
    pick = rng.integers(2, size=len(e)).astype(bool)
    long_cat = np.where(pick, lt1[user], lt2[user])
    item[src_long] = world.item_in(rng, long_cat[src_long])
    item[src_drift] = world.item_in(rng, drift[src_drift])
    cat = world.item_cat[item]

    in_long = (cat == lt1[user]) | (cat == lt2[user])
    if cfg.long_range:
        p_true = _sigmoid(-1.5 + world.quality[item] + world.cat_effect[cat] + 3.0 * in_long)
    else:
        p_true = _sigmoid(cfg.label_bias + world.quality[item] + 3.0 * in_long + 1.5 * (cat == drift))
    label = (rng.random(len(e)) < p_true).astype(np.int8)
    action = np.where(label == 1, np.where(rng.random(len(e)) < 0.25, 3, 2), 1)

    span = cfg.days * 86400
    t_start = T0 + rng.integers(0, span // 2, size=n_users)
    t_end = T0 + span - 1
    g = rng.random(len(e))
    tie, in_session = g < 0.25, (g >= 0.25) & (g < 0.85)
    small = np.where(in_session, rng.exponential(60.0, len(e)), 0.0)
    brk = np.where(~tie & ~in_session, rng.exponential(1.0, len(e)), 0.0)
    small[start] = 0.0
    brk[start] = 0.0
    room = np.maximum((t_end - t_start) - np.add.reduceat(small, start), 0.0)
    scale = room / np.maximum(np.add.reduceat(brk, start), 1e-9)
    gaps = small + brk * scale[user]
    cum = np.cumsum(gaps)
    cum -= np.repeat(cum[start] - gaps[start], n)
    ts = np.minimum(t_start[user] + np.floor(cum).astype(np.int64), t_end)
    if cfg.impressions_per_request > 1:  # a request's impressions share its first event's ts
        ts = ts[start[user] + e // cfg.impressions_per_request * cfg.impressions_per_request]

    return pa.table(
        {
            "user_id": (first_user + user + 1).astype(np.int64),
            "item_id": (item + 1).astype(np.int64),
            "ts": ts.astype(np.int64),
            "label": label,
            "category_id": (cat + 1).astype(np.int64),
            "action": action.astype(np.int64),
            "p_true": p_true.astype(np.float64),
            **(extras.columns(item, early) if extras else {}),
        }
    )


def synthesize(cfg: SynthConfig, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the synthetic log to `out` (a directory of parquet files). Returns a summary."""
    rng = np.random.default_rng(cfg.seed)
    world = _World(cfg, rng)
    extras = _Extras(cfg) if cfg.extra_columns else None
    users_per_chunk = max(1, cfg.chunk_events // (2 * cfg.events_per_user))
    rows = files = 0
    with (
        atomic_dir(out, overwrite) as tmp,
        tqdm(total=cfg.users, unit="user", desc="synth", disable=not progress) as bar,
    ):
        writer, in_file = None, 0
        for first in range(0, cfg.users, users_per_chunk):
            table = _chunk(cfg, world, rng, first, min(users_per_chunk, cfg.users - first), extras)
            if writer is None or in_file >= cfg.rows_per_file:
                if writer is not None:
                    writer.close()
                writer = pq.ParquetWriter(tmp / f"part-{files:05d}.parquet", table.schema)
                files, in_file = files + 1, 0
            writer.write_table(table, row_group_size=1 << 20)
            rows += table.num_rows
            in_file += table.num_rows
            bar.update(min(users_per_chunk, cfg.users - first))
        writer.close()
    return {
        "out": str(out),
        "rows": rows,
        "users": cfg.users,
        "items": cfg.items,
        "categories": cfg.n_categories,
        "files": files,
        "seed": cfg.seed,
        "impressions_per_request": cfg.impressions_per_request,
        "long_range": cfg.long_range,
    }

"""The declared feature spec: which logged columns a model reads, and where (issue 15).

Contract. A run config's `[features]` table declares, by column name of the behaviour log:

    sequence  = ["category_id", "action"]  per-event categorical columns, fields of every history
                                           token (item_id always is one, and is never listed)
    candidate = ["category_id"]            the candidate item's categorical columns (item_id always);
                                           a name also in `sequence` shares its embedding table
    user      = []                         per-user profile columns: user side (cacheable)
    context   = []                         per-request categorical columns: candidate side
    dense     = []                         float columns of the logged row: candidate side,
                                           normalised with the train split's mean and std
    [features.buckets]                     embedding-table rows per column (optional overrides)

Names are disjoint between user, context, dense and sequence ∪ candidate; `user_id`, `ts`,
`label` and `hist_len` are never features, `item_id` is always there. Any categorical column
may be `list<int64>` (multi-valued, pooled); which are is learnt from the data (`resolve`).

Derived keys (one name everywhere — builder, loader, export, online store, serving):

    history_keys    hist_<c> for c in ("item_id", *sequence)      KJT, jagged per sample
    candidate_keys  ("item_id", *candidate)                        KJT, one value (list: many)
    user_keys       ("user_id", *user)                             KJT, one value (list: many)
    context_keys    context                                        KJT, one value (list: many)
    dense_keys      dense                                          float32 (B,) each
    sparse_keys     history + candidate + user + context, in that order

The default spec reproduces the keys of the model before the spec existed:
hist_item_id, hist_category_id, hist_action, item_id, category_id, user_id.

Buckets rule (`resolve`): a column listed in `[features.buckets]` keeps its value. The four
columns that `ModelConfig` sizes (item_id, category_id, action, user_id: `*_buckets`) keep the
ModelConfig's size, so the default spec has today's parameters. Every other column gets
`default_buckets(cardinality)`: ids below 2^20 get `max_id + 2` rows (id mod rows is the id
itself: no collisions, plus one spare row), larger (hashed) ids the next prime ≥ 2 × distinct.

This module knows nothing of files or HTTP: `resolve` takes meta.json's content as a dict.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import LongerError

KINDS = ("sequence", "candidate", "user", "context", "dense")
RESERVED = ("user_id", "ts", "label", "hist_len", "row_id")
HIST_PREFIX = "hist_"
DIRECT_MAX = 1 << 20  # ids below this are their own row (no hashing collisions)
# Columns sized by ModelConfig's `*_buckets` fields (the tables the model had before the spec).
MODEL_SIZED = {
    "item_id": "item_buckets",
    "category_id": "category_buckets",
    "action": "action_buckets",
    "user_id": "user_buckets",
}
# Their table names (a history key and its candidate key share one table).
LEGACY_TABLES = {"item_id": "item", "category_id": "category", "action": "action", "user_id": "user"}


class SpecError(LongerError, ValueError):
    """A `[features]` table or a dataset that breaks the spec contract; the message names the key."""


def hist_key(column: str) -> str:
    return HIST_PREFIX + column


def next_prime(n: int) -> int:
    n = max(2, n)
    while any(n % p == 0 for p in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def default_buckets(max_id: int, distinct: int) -> int:
    """Table rows for a column with these statistics (the module docstring's rule)."""
    if max_id < DIRECT_MAX:
        return max_id + 2
    return next_prime(2 * distinct)


@dataclass(frozen=True)
class FeatureSpec:
    sequence: tuple[str, ...] = ("category_id", "action")
    candidate: tuple[str, ...] = ("category_id",)
    user: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    buckets: Mapping[str, int] = field(default_factory=dict)  # declared overrides, then resolved
    # Filled by `resolve` from the dataset (never declared):
    lists: tuple[str, ...] = ()  # list<int64> (multi-valued, pooled) columns
    dense_stats: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # (mean, std), train split

    def __post_init__(self):
        for kind in KINDS:
            names = getattr(self, kind)
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise SpecError(f"[features] {kind}: must be a list of column names, got {names!r}")
            object.__setattr__(self, kind, tuple(names))
            for n in names:
                if n == "item_id":
                    raise SpecError(f"[features] {kind}: 'item_id' is always a feature; do not list it")
                if n in RESERVED:
                    raise SpecError(f"[features] {kind}: '{n}' is not a feature column (reserved)")
                if names.count(n) > 1:
                    raise SpecError(f"[features] {kind}: column '{n}' listed twice")
        owner: dict[str, str] = {}
        for kind in ("user", "context", "dense"):
            for n in getattr(self, kind):
                if n in self.sequence or n in self.candidate or n in owner:
                    other = owner.get(n) or ("sequence" if n in self.sequence else "candidate")
                    raise SpecError(
                        f"[features] {kind}: column '{n}' is also in {other}; a column has one kind"
                    )
                owner[n] = kind
        for n, rows in self.buckets.items():
            if n not in self.categorical and n != "item_id" and n != "user_id":
                raise SpecError(f"[features.buckets] {n}: not a declared categorical column")
            if not isinstance(rows, int) or isinstance(rows, bool) or rows < 2:
                raise SpecError(f"[features.buckets] {n}: must be an integer >= 2, got {rows!r}")
        for n in self.lists:
            if n in self.dense:
                raise SpecError(f"[features] dense: column '{n}' is a list; dense columns are floats")

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, table: Mapping | None) -> FeatureSpec:
        """From a run config's `[features]` table (None or {}: the default spec)."""
        table = dict(table or {})
        known = set(KINDS) | {"buckets"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise SpecError(f"[features] unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        buckets = table.get("buckets", {})
        if not isinstance(buckets, Mapping):
            raise SpecError(f"[features] buckets: must be a table of column = rows, got {buckets!r}")
        for kind in KINDS:
            if kind in table and not isinstance(table[kind], list):
                raise SpecError(f"[features] {kind}: must be a list of column names, got {table[kind]!r}")
        return cls(**{k: tuple(table[k]) for k in KINDS if k in table}, buckets=dict(buckets))

    def resolve(self, meta: Mapping, model_buckets: Mapping[str, int] | None = None) -> FeatureSpec:
        """The spec completed from a build's meta.json: buckets, list-ness and dense statistics.

        `model_buckets` maps the MODEL_SIZED columns to their ModelConfig sizes (e.g.
        {"item_id": cfg.item_buckets, ...}); without it those keep ModelConfig's defaults.
        Resolving a resolved spec (a bundle's) changes nothing it holds: its buckets and dense
        statistics (the training split's) stay, whatever dataset it is evaluated on.
        """
        cards = meta.get("cardinalities", {})
        kinds = meta.get("features", {}).get("kinds", {})
        stats = meta.get("features", {}).get("dense_stats", {})
        buckets = dict(self.buckets)
        for col in self.categorical:
            if col not in cards:
                raise SpecError(f"column '{col}': declared in [features] but not in the dataset (meta.json)")
            if col in buckets:
                continue
            if col in MODEL_SIZED:
                if model_buckets and col in model_buckets:
                    buckets[col] = int(model_buckets[col])
                continue
            buckets[col] = default_buckets(int(cards[col]["max_id"]), int(cards[col].get("distinct", 0)))
        dense_stats = {}
        for col in self.dense:
            if col in self.dense_stats:  # already resolved (a bundle's spec): the training statistics stay
                dense_stats[col] = self.dense_stats[col]
                continue
            if col not in stats:
                raise SpecError(
                    f"column '{col}': declared dense in [features] but the dataset has no float column by that name"
                )
            dense_stats[col] = (float(stats[col]["mean"]), float(stats[col]["std"]))
        lists = tuple(c for c in self.categorical if kinds.get(c) == "list")
        return dataclasses.replace(self, buckets=buckets, lists=lists, dense_stats=dense_stats)

    def check(self, kinds: Mapping[str, str]) -> None:
        """Every declared column exists with a usable type. `kinds` maps a data set's column to
        "int", "list" (list<int64>) or "float"; SpecError names the first bad column."""
        for kind in KINDS:
            want = ("float",) if kind == "dense" else ("int", "list")
            for col in getattr(self, kind):
                have = kinds.get(col)
                if have is None:
                    raise SpecError(f"column '{col}': declared in [features] {kind} but not in the log")
                if have not in want:
                    raise SpecError(
                        f"column '{col}': declared in [features] {kind} needs "
                        f"{' or '.join(_TYPE_NAMES[w] for w in want)}, the log has {_TYPE_NAMES.get(have, have)}"
                    )

    # --- derived names ---------------------------------------------------------------------------

    @property
    def categorical(self) -> tuple[str, ...]:
        """Every declared categorical column (not item_id/user_id), each once, in declaration order."""
        return tuple(dict.fromkeys(self.sequence + self.candidate + self.user + self.context))

    @property
    def history_fields(self) -> tuple[str, ...]:
        """Columns of each history token (and of sequences/), item_id first."""
        return ("item_id", *self.sequence)

    @property
    def history_keys(self) -> tuple[str, ...]:
        return tuple(hist_key(c) for c in self.history_fields)

    @property
    def candidate_keys(self) -> tuple[str, ...]:
        return ("item_id", *self.candidate)

    @property
    def user_keys(self) -> tuple[str, ...]:
        return ("user_id", *self.user)

    @property
    def context_keys(self) -> tuple[str, ...]:
        return self.context

    @property
    def dense_keys(self) -> tuple[str, ...]:
        return self.dense

    @property
    def sparse_keys(self) -> tuple[str, ...]:
        """The KJT's keys, in order."""
        return self.history_keys + self.candidate_keys + self.user_keys + self.context_keys

    @property
    def sample_columns(self) -> tuple[str, ...]:
        """Logged columns a training sample needs besides its history."""
        return tuple(
            dict.fromkeys(
                ("user_id", "item_id", "ts", "label", *self.candidate, *self.user, *self.context, *self.dense)
            )
        )

    def tables(self) -> dict[str, tuple[str, ...]]:
        """Embedding table → the KJT keys that look it up (a history key and its candidate key share)."""
        out: dict[str, list[str]] = {}
        for col in ("item_id", *self.categorical, "user_id"):
            keys = [hist_key(col)] if col in self.history_fields else []
            keys += [col] if col in self.candidate_keys + self.user_keys + self.context_keys else []
            out.setdefault(table_name(col), []).extend(keys)
        return {t: tuple(k) for t, k in out.items()}

    def is_list(self, column: str) -> bool:
        return column in self.lists

    # --- persistence (the bundle's feature_schema.json) ------------------------------------------

    def to_json(self) -> dict:
        return {
            **{k: list(getattr(self, k)) for k in KINDS},
            "buckets": dict(self.buckets),
            "lists": list(self.lists),
            "dense_stats": {c: list(v) for c, v in self.dense_stats.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping | str) -> FeatureSpec:
        d = json.loads(d) if isinstance(d, str) else dict(d)
        spec = cls.from_config({k: d[k] for k in (*KINDS, "buckets") if k in d})
        return dataclasses.replace(
            spec,
            lists=tuple(d.get("lists", ())),
            dense_stats={c: (float(m), float(s)) for c, (m, s) in d.get("dense_stats", {}).items()},
        )


_TYPE_NAMES = {"int": "an integer column", "list": "a list<int64> column", "float": "a float column"}


def table_name(column: str) -> str:
    return LEGACY_TABLES.get(column, column)

"""Requests reconstructed from a behaviour log, and their assignment to arms."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feature_store.schema import read_log
from longer.errors import UsageError


@dataclass(frozen=True)
class Request:
    """One user's events within one request window: the candidates shown and what happened."""

    user_id: int
    ts: int  # the window's first second: the request time
    item_id: tuple[int, ...]
    category_id: tuple[int, ...]
    action: tuple[int, ...]
    label: tuple[int, ...]
    event_ts: tuple[int, ...]
    # every other logged column, per event (a list column: lists); an arm sends those its
    # bundle declares: candidate and dense columns per candidate, context columns from the first
    columns: dict[str, tuple] = field(default_factory=dict)


FIXED = ("user_id", "ts", "label", "item_id", "category_id", "action")


def as_json(v):
    """A logged value as a JSON value (numpy ints, floats, lists)."""
    return v.tolist() if hasattr(v, "tolist") else list(v) if isinstance(v, (list, tuple)) else v


def log_columns(log: str | Path) -> dict[str, np.ndarray]:
    """A log's columns as arrays, with `category_id` and `action` = 0 where the log has none."""
    t = read_log(log)
    cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
    for c in ("category_id", "action"):
        cols.setdefault(c, np.zeros(len(cols["user_id"]), np.int64))
    return cols


def by_user_then_time(cols: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """`rows` reordered by (user_id, ts, item_id)."""
    return rows[np.lexsort((cols["item_id"][rows], cols["ts"][rows], cols["user_id"][rows]))]


def requests_from_log(
    log: str | Path, window_s: int = 1, start: int | None = None, end: int | None = None
) -> list[Request]:
    """Group each user's events into requests: a request starts at an event and holds that
    user's events until `window_s` seconds later (default 1: the same second). Requests come in
    (ts, user_id) order; only events with start <= ts < end are replayed."""
    if window_s < 1:
        raise UsageError(f"window_s must be >= 1, got {window_s}")
    cols = log_columns(log)
    cat, act = cols["category_id"], cols["action"]
    keep = np.ones(len(cols["user_id"]), bool)
    if start is not None:
        keep &= cols["ts"] >= start
    if end is not None:
        keep &= cols["ts"] < end
    idx = np.flatnonzero(keep)
    order = by_user_then_time(cols, idx)
    out: list[Request] = []
    i = 0
    while i < len(order):
        u, t0 = cols["user_id"][order[i]], cols["ts"][order[i]]
        j = i
        while j < len(order) and cols["user_id"][order[j]] == u and cols["ts"][order[j]] < t0 + window_s:
            j += 1
        rows = order[i:j]
        extra = {c: tuple(as_json(v) for v in cols[c][rows]) for c in cols if c not in FIXED}
        out.append(
            Request(
                int(u),
                int(t0),
                *(
                    tuple(int(v) for v in a[rows])
                    for a in (cols["item_id"], cat, act, cols["label"], cols["ts"])
                ),
                columns=extra,
            )
        )
        i = j
    out.sort(key=lambda r: (r.ts, r.user_id))
    return out


def assign_arm(user_id: int, arms: list[str], split: list[float], salt: str = "longer") -> str:
    """A user's arm: a salted blake2b hash of the user id mapped onto the cumulative split.
    Stable across processes and runs; changing the salt reshuffles users."""
    if len(arms) != len(split) or not arms:
        raise UsageError(f"{len(arms)} arms but {len(split)} split weights")
    if any(w < 0 for w in split) or sum(split) <= 0:
        raise UsageError(f"split weights must be >= 0 with a positive sum, got {split}")
    h = int.from_bytes(hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest(), "little")
    x = h / 2**64 * sum(split)
    acc = 0.0
    for arm, w in zip(arms, split):
        acc += w
        if x < acc:
            return arm
    return arms[-1]

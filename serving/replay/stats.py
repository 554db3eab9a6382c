"""Replay statistics: NDCG@k per request, and B − A differences with bootstrap confidence
intervals that resample users (a user's requests stay together, as they are not independent)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def ndcg_at_k(labels, scores, k: int = 10) -> float:
    """NDCG@k of one request's candidates (nan when the request has no positive)."""
    labels, scores = np.asarray(labels, float), np.asarray(scores, float)
    if labels.sum() <= 0:
        return float("nan")
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    order = np.argsort(-scores, kind="stable")[:k]
    ideal = np.sort(labels)[::-1][:k]
    return float((labels[order] * discount[: len(order)]).sum() / (ideal * discount[: len(ideal)]).sum())


Metric = Callable[[dict, np.ndarray], float]  # metric(arm columns, row indices) → value


def _rows_by_user(users: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(users, kind="stable")
    uniq, first = np.unique(users[order], return_index=True)
    return dict(zip(uniq.tolist(), np.split(order, first[1:])))


def bootstrap_diff(
    a: dict,
    b: dict,
    metric: Metric,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    resample: Callable[[np.random.Generator, dict], dict] | None = None,
) -> dict:
    """metric(B) − metric(A) and its percentile bootstrap CI.

    `a` and `b` hold per-row arrays, among them `user_id`. Each draw resamples the users of
    both arms together (with replacement) and takes every row of each drawn user, so a user's
    requests stay together, and a paired replay (every request in both arms) stays paired.
    `resample(rng, arm)`, when given, also redraws something else of each arm in every draw
    (the quality bench: its training seeds), so the interval covers that variation too."""
    rng = np.random.default_rng(seed)
    rows_a, rows_b = _rows_by_user(np.asarray(a["user_id"])), _rows_by_user(np.asarray(b["user_id"]))
    users = np.array(sorted(set(rows_a) | set(rows_b)))
    empty = np.zeros(0, np.int64)
    everything_a, everything_b = np.arange(len(a["user_id"])), np.arange(len(b["user_id"]))
    point = metric(b, everything_b) - metric(a, everything_a)
    draws = []
    for _ in range(n_boot):
        pick = rng.choice(users, size=len(users), replace=True).tolist()
        ra = np.concatenate([rows_a.get(u, empty) for u in pick])
        rb = np.concatenate([rows_b.get(u, empty) for u in pick])
        da, db = (resample(rng, a), resample(rng, b)) if resample else (a, b)
        draws.append(metric(db, rb) - metric(da, ra))
    draws = np.asarray(draws, float)
    draws = draws[np.isfinite(draws)]
    lo, hi = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2]) if len(draws) else (np.nan, np.nan)
    return {
        "diff": float(point),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "level": level,
        "n_boot": len(draws),
    }

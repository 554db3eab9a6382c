"""Ranking and calibration metrics, exact (no binning), vectorised with numpy.

auc          P(score of a random positive > score of a random negative), ties count 1/2
gauc         per-user AUC weighted by the user's sample count; users with one class skipped
logloss      mean binary cross-entropy of sigmoid(logit) (computed from logits: stable)
calibration  mean predicted probability / mean label (1.0 = calibrated)
"""

from __future__ import annotations

import numpy as np


def _average_ranks(group: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by (group, score); return the order and 1-based within-group ranks, ties averaged."""
    order = np.lexsort((scores, group))
    g, s = group[order], scores[order]
    n = len(s)
    idx = np.arange(n)
    new_group = np.r_[True, g[1:] != g[:-1]] if n else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(new_group, idx, 0))
    new_run = new_group | np.r_[True, s[1:] != s[:-1]] if n else np.zeros(0, bool)
    run_id = np.cumsum(new_run) - 1
    run_first = idx[new_run]
    run_last = np.r_[run_first[1:], n] - 1
    avg = (run_first + run_last) / 2.0 + 1.0  # 1-based average position of each tie run
    return order, avg[run_id] - group_start


def _grouped_auc(group: np.ndarray, labels: np.ndarray, scores: np.ndarray):
    order, ranks = _average_ranks(group, scores)
    g, y = group[order], labels[order].astype(bool)
    uniq, first, count = np.unique(g, return_index=True, return_counts=True)
    pos = np.add.reduceat(y.astype(np.int64), first) if len(g) else np.zeros(0, np.int64)
    rank_pos = np.add.reduceat(np.where(y, ranks, 0.0), first) if len(g) else np.zeros(0)
    neg = count - pos
    ok = (pos > 0) & (neg > 0)
    auc = np.full(len(uniq), np.nan)
    auc[ok] = (rank_pos[ok] - pos[ok] * (pos[ok] + 1) / 2.0) / (pos[ok] * neg[ok])
    return auc, count, ok


def auc(labels, scores) -> float:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    a, _, ok = _grouped_auc(np.zeros(len(labels), np.int64), labels, scores)
    return float(a[0]) if len(a) and ok[0] else float("nan")


def gauc(users, labels, scores) -> float:
    a, count, ok = _grouped_auc(np.asarray(users), np.asarray(labels), np.asarray(scores, dtype=np.float64))
    return float(np.sum(a[ok] * count[ok]) / np.sum(count[ok])) if ok.any() else float("nan")


def logloss(labels, logits) -> float:
    y, z = np.asarray(labels, np.float64), np.asarray(logits, np.float64)
    # -[y log σ(z) + (1-y) log(1-σ(z))] = softplus(z) - y·z
    return float(np.mean(np.logaddexp(0.0, z) - y * z)) if len(y) else float("nan")


def calibration(labels, logits) -> float:
    y = np.asarray(labels, np.float64)
    p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    return float(p.mean() / y.mean()) if len(y) and y.mean() > 0 else float("nan")


def all_metrics(users, labels, logits) -> dict:
    return {
        "auc": auc(labels, logits),
        "gauc": gauc(users, labels, logits),
        "logloss": logloss(labels, logits),
        "calibration": calibration(labels, logits),
        "n": len(labels),
    }

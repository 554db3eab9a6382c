"""Verdicts with confidence for `longer bench quality`'s claims against the paper.

A claim compares two variants, A and B (B on the paper's side: LONGER against the transformer,
k recent queries against all, ...), on the same eval samples. Its figure is the paired
difference Δ = AUC(B) − AUC(A), each AUC the mean over the seeds, with a 95 % percentile
bootstrap interval from `serving.replay.stats.bootstrap_diff` (the replay's code): every draw
resamples the users — a user's samples together, the same users for both variants, so the
difference stays paired — and also each variant's seeds, with replacement, so the interval
covers training noise (a variant whose seeds disagree) as well as eval-sample noise.

The claim needs Δ above a threshold t: t = −margin for "matches" (non-inferiority: B may trail A
by at most the margin), t = 0 for "beats". The verdict has three states:

    agrees        the whole interval is above t
    disagrees     the whole interval is below t
    inconclusive  the interval contains t: the data cannot tell

With few seeds the seed part of the interval is coarse (3 seeds give 10 distinct means); a
variant whose seeds spread widely is inconclusive rather than agreeing.
"""

from __future__ import annotations

import numpy as np

from serving.replay.stats import bootstrap_diff

LEVEL = 0.95
MATCH_MARGIN = 0.002  # AUC a "matches" claim allows B to trail A by (the paper's gaps are ~0.001–0.002)
N_BOOT = 1000
STATES = ("agrees", "disagrees", "inconclusive")
RULE = (
    f"Verdicts: Δ = AUC(paper's side) − AUC(other), each the mean over seeds, on the same eval samples, "
    f"with a {LEVEL:.0%} bootstrap CI that resamples users (the replay's paired bootstrap) and, within "
    "each draw, each variant's seeds. A claim needs Δ above a threshold: "
    f'−{MATCH_MARGIN} for "matches" (may trail by at most {MATCH_MARGIN} AUC), 0 for "beats". '
    "**agrees**: the whole CI is above the threshold; **disagrees**: the whole CI is below it; "
    "**inconclusive**: the CI contains it. A FLOPs condition, where the claim has one, is exact."
)


def stack_seeds(preds: list[dict]) -> dict:
    """Per-seed prediction columns (row_id, user_id, label, logit) of one variant → one arm:
    row_id, user_id, label and `logit` of shape (samples, seeds). Every seed must have scored
    the same samples."""
    first = preds[0]
    for p in preds[1:]:
        if not np.array_equal(p["row_id"], first["row_id"]):
            raise ValueError("the seeds of a variant scored different eval samples (row_id differs)")
    return {
        "row_id": np.asarray(first["row_id"]),
        "user_id": np.asarray(first["user_id"]),
        "label": np.asarray(first["label"]),
        "logit": np.stack([np.asarray(p["logit"], np.float64) for p in preds], axis=1),
    }


class _SortedAUC:
    """AUC of one arm's seeds on a resample given as row indices (duplicates allowed), in O(n)
    per seed: each seed's scores are sorted once, a draw only reweights the rows. Ties count
    1/2, as in `trainer.metrics.auc`."""

    def __init__(self, label: np.ndarray, logit: np.ndarray):
        self.label = np.asarray(label, np.float64)
        self.orders, self.groups = [], []
        for s in range(logit.shape[1]):
            order = np.argsort(logit[:, s], kind="stable")
            z = logit[order, s]
            self.orders.append(order)
            self.groups.append(np.cumsum(np.r_[True, z[1:] != z[:-1]]) - 1 if len(z) else z.astype(int))

    def __call__(self, rows: np.ndarray, seeds: np.ndarray) -> float:
        w = np.bincount(rows, minlength=len(self.label)).astype(np.float64)
        pos_w, neg_w = w * self.label, w * (1 - self.label)
        p, n = pos_w.sum(), neg_w.sum()
        if p == 0 or n == 0:
            return float("nan")
        aucs = []
        for s in seeds:
            order, g = self.orders[s], self.groups[s]
            gp = np.bincount(g, pos_w[order])
            gn = np.bincount(g, neg_w[order])
            below = np.cumsum(gn) - gn
            aucs.append(float((gp * (below + 0.5 * gn)).sum() / (p * n)))
        return float(np.mean(aucs))


def _arm(pred: dict) -> dict:
    n_seeds = pred["logit"].shape[1]
    return {**pred, "seeds": np.arange(n_seeds), "_auc": _SortedAUC(pred["label"], pred["logit"])}


def _mean_auc(arm: dict, rows: np.ndarray) -> float:
    return arm["_auc"](rows, arm["seeds"])


def _resample_seeds(rng: np.random.Generator, arm: dict) -> dict:
    n = len(arm["seeds"])
    return {**arm, "seeds": rng.integers(0, n, n)}


def paired_delta(a: dict, b: dict, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Δ = mean-over-seeds AUC(B) − AUC(A) on the same samples, with its bootstrap CI.
    `a`, `b`: arms from `stack_seeds`."""
    if not np.array_equal(a["row_id"], b["row_id"]):
        raise ValueError("the two variants scored different eval samples (row_id differs)")
    d = bootstrap_diff(
        _arm(a), _arm(b), _mean_auc, n_boot=n_boot, seed=seed, level=LEVEL, resample=_resample_seeds
    )
    return {**d, "seeds": [a["logit"].shape[1], b["logit"].shape[1]]}


def verdict(ci_low: float, ci_high: float, threshold: float) -> str:
    """Three states of "Δ > threshold" from the interval (see the module docstring)."""
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "inconclusive"
    if ci_low > threshold:
        return "agrees"
    if ci_high < threshold:
        return "disagrees"
    return "inconclusive"


def combine(states: list[str]) -> str:
    """A claim made of several comparisons: agrees when all agree, disagrees when any
    disagrees, else inconclusive."""
    if any(s == "disagrees" for s in states):
        return "disagrees"
    return "agrees" if states and all(s == "agrees" for s in states) else "inconclusive"


def deltas_vs(rows: list[dict], base_key: str, arms: dict, key_of_row, n_boot: int = N_BOOT) -> None:
    """Each row's paired Δ AUC against the base variant, with its CI, as row["delta_vs_base"]
    (None for the base itself, or without the base's predictions). Computed once per config."""
    done: dict[str, dict | None] = {}
    for r in rows:
        k = key_of_row(r)
        if k not in done:
            done[k] = (
                None
                if k == base_key or base_key not in arms
                else paired_delta(arms[base_key], arms[k], n_boot)
            )
        r["delta_vs_base"] = done[k]

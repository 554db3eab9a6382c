"""How much click signal the last L events of a history hold, measured without a sequence model.

`window_ceilings(data, windows)` scores every eval sample with a logistic regression on
hand-made count features and returns its AUC per window L:

    base        the candidate item's and its category's smoothed click rates (logits), from
                the train rows before the fit window
    + window L  among the sample's last L history events (point in time: the first `hist_len`
                events of the user's sequence, as the loader serves them): how many share the
                candidate's category, how many of those were clicked, and their smoothed
                click rate

The regression is fit on the latest FIT_FRAC of the train split by time and judged on the eval
split, so nothing is fit on eval labels. Window 0 is the base alone. A rise from one window to
the next is signal that lies between those distances; a sequence model that stays below a
window's ceiling at that max_len is not using what its window holds (docs/results.md, length
scaling). Needs `category_id` in the dataset's samples and sequences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from longer.errors import InputError, UsageError

from .metrics import auc

FIT_FRAC = 0.1  # the latest 10 % of train rows by time fit the regression (like train.val_frac)
SAMPLE_COLS = ["user_id", "item_id", "category_id", "label", "ts", "hist_len"]


def window_ceilings(data: str | Path, windows: list[int]) -> dict[int, float]:
    """{L: eval AUC of the regression with window-L features} for L in [0, *windows]."""
    data = Path(data)
    if any(w < 1 for w in windows):
        raise UsageError(f"window lengths must be >= 1, got {windows}")
    train, ev = (_samples(data / split) for split in ("train", "eval"))
    cut = np.quantile(train["ts"], 1 - FIT_FRAC)
    source, fit = train["ts"] < cut, train["ts"] >= cut
    if not source.any() or not fit.any():
        raise InputError(f"{data / 'train'}: too few distinct timestamps to hold out a fit window")
    seqs = _sequences(data / "sequences")
    ws = sorted(set(windows))
    out = {}
    x_fit = _features(train, fit, train, source, seqs, ws)
    x_ev = _features(ev, np.ones(len(ev["ts"]), bool), train, source, seqs, ws)
    for j, w in enumerate([0, *ws]):
        cols = slice(0, 2 + 3 * j)  # base columns, then 3 per window up to this one
        beta = logistic_fit(x_fit[:, cols], train["label"][fit])
        out[w] = auc(ev["label"], _design(x_ev[:, cols]) @ beta)
    return out


def _samples(split: Path) -> dict[str, np.ndarray]:
    names = pq.read_schema(next(split.glob("*.parquet"))).names
    missing = [c for c in SAMPLE_COLS if c not in names]
    if missing:
        raise InputError(f"{split}: the window ceilings need column(s) {missing}")
    t = pq.read_table(split, columns=SAMPLE_COLS)
    return {c: t.column(c).to_numpy() for c in SAMPLE_COLS}


def _sequences(path: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """user → (category ids, labels) of the user's whole sequence, oldest first."""
    t = pq.read_table(path, columns=["user_id", "category_id", "label"])
    users = t.column("user_id").to_numpy()
    cat, lab = (t.column(c).combine_chunks() for c in ("category_id", "label"))
    off = cat.offsets.to_numpy()
    cv, lv = cat.values.to_numpy(), lab.values.to_numpy()
    return {int(u): (cv[off[i] : off[i + 1]], lv[off[i] : off[i + 1]]) for i, u in enumerate(users)}


def _ctr_logit(keys: np.ndarray, src_keys: np.ndarray, src_labels: np.ndarray) -> np.ndarray:
    """Smoothed (clicks + 1) / (shown + 2) of each key in the source rows, as a logit."""
    uniq, idx = np.unique(src_keys, return_inverse=True)
    shown = np.bincount(idx, minlength=len(uniq)).astype(np.float64)
    clicks = np.bincount(idx, weights=src_labels.astype(np.float64), minlength=len(uniq))
    pos = np.clip(np.searchsorted(uniq, keys), 0, len(uniq) - 1)
    known = uniq[pos] == keys
    p = (np.where(known, clicks[pos], 0.0) + 1) / (np.where(known, shown[pos], 0.0) + 2)
    return np.log(p / (1 - p))


def _features(rows, take, src, src_take, seqs, windows) -> np.ndarray:
    """(n, 2 + 3·len(windows)): item and category CTR logits, then per window L: log1p(same-
    category events), log1p(their clicks), their smoothed click rate."""
    r = {c: v[take] for c, v in rows.items()}
    base = [_ctr_logit(r[c], src[c][src_take], src["label"][src_take]) for c in ("item_id", "category_id")]
    longest = windows[-1]
    counts = np.zeros((len(r["ts"]), len(windows), 2))
    for i, (u, c, h) in enumerate(zip(r["user_id"], r["category_id"], r["hist_len"])):
        cats, labels = seqs[int(u)]
        lo = max(0, int(h) - longest)
        same = cats[lo:h][::-1] == c  # newest first
        n, k = np.cumsum(same), np.cumsum(same & (labels[lo:h][::-1] > 0))
        if len(same):  # no history: every count stays 0
            at = np.minimum(windows, len(same)) - 1  # the last L events (fewer when the history is short)
            counts[i, :, 0], counts[i, :, 1] = n[at], k[at]
    n, k = counts[..., 0], counts[..., 1]
    per_window = np.stack([np.log1p(n), np.log1p(k), (k + 1) / (n + 2)], axis=-1).reshape(len(n), -1)
    return np.column_stack([*base, per_window])


def _design(x: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones(len(x)), x])


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-4, iters: int = 50) -> np.ndarray:
    """Coefficients [intercept, *per column] of an L2-regularised logistic regression (Newton's
    method; a handful of columns, so the Hessian is tiny)."""
    a = _design(x)
    beta = np.zeros(a.shape[1])
    reg = l2 * len(y) * np.eye(a.shape[1])
    reg[0, 0] = 0.0  # no penalty on the intercept
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(a @ beta, -30, 30)))
        grad = a.T @ (p - y) + reg @ beta
        hess = (a * (p * (1 - p))[:, None]).T @ a + reg
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta

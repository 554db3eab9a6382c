import itertools

import numpy as np
import pytest

from trainer.metrics import all_metrics, auc, calibration, gauc, logloss


def brute_auc(y, s):
    pos = [si for yi, si in zip(y, s) if yi]
    neg = [si for yi, si in zip(y, s) if not yi]
    if not pos or not neg:
        return float("nan")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_gauc(u, y, s):
    num = den = 0.0
    for user in set(u):
        idx = [i for i, v in enumerate(u) if v == user]
        a = brute_auc([y[i] for i in idx], [s[i] for i in idx])
        if not np.isnan(a):
            num += a * len(idx)
            den += len(idx)
    return num / den


@pytest.mark.parametrize("seed", range(8))
def test_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    u = rng.integers(0, 12, n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n), 1)  # many ties
    assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert gauc(u, y, s) == pytest.approx(brute_gauc(list(u), list(y), list(s)), abs=1e-12)
    p = 1 / (1 + np.exp(-s))
    assert logloss(y, s) == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)), abs=1e-12)
    assert calibration(y, s) == pytest.approx(p.mean() / y.mean())


def test_edge_cases():
    assert auc([1, 1], [0.1, 0.2]) != auc([1, 1], [0.1, 0.2])  # nan: one class
    assert gauc([1, 1, 2, 2], [1, 1, 0, 1], [0.3, 0.1, 0.5, 0.2]) == 0.0  # user 1 skipped
    assert logloss([1], [800.0]) == pytest.approx(0.0) and np.isfinite(logloss([0], [800.0]))
    m = all_metrics([1, 1, 1, 1], [0, 1, 0, 1], [-1.0, 2.0, 0.5, 0.4])
    assert m["auc"] == 0.75 and m["n"] == 4

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from trainer.metrics import all_metrics, auc, calibration, gauc, logloss


def oracle_auc(y, s):
    """sklearn's AUC; nan where one class is missing (sklearn raises there)."""
    return roc_auc_score(y, s) if len(set(y)) == 2 else float("nan")


def brute_gauc(u, y, s):
    """GAUC by its definition (no library has it): per-user AUC weighted by the user's samples."""
    num = den = 0.0
    for user in set(u):
        idx = [i for i, v in enumerate(u) if v == user]
        a = oracle_auc([y[i] for i in idx], [s[i] for i in idx])
        if not np.isnan(a):
            num += a * len(idx)
            den += len(idx)
    return num / den


@pytest.mark.parametrize("seed", range(8))
def test_against_sklearn_and_the_gauc_definition(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    u = rng.integers(0, 12, n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n), 1)  # many ties
    assert auc(y, s) == pytest.approx(oracle_auc(y, s), abs=1e-12)
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

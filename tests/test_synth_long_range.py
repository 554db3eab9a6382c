"""`longer synth --long-range`: clicks depend on behaviour hundreds to thousands of events back."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from feature_store.builder import BuildConfig, build
from feature_store.synth import SynthConfig, synthesize
from tests.test_synth import auc, category_ctr_scores


@pytest.fixture(scope="module")
def long_range(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_range")
    cfg = SynthConfig(users=120, items=3000, events_per_user=1200, seed=2, long_range=True)
    synthesize(cfg, root / "log", progress=False)
    build(root / "log", root / "data", BuildConfig(max_len=2400, test_days=4), progress=False)
    return root


def test_only_the_far_history_reveals_the_interest(long_range):
    labels, recent, p_true = category_ctr_scores(long_range / "data", 50)
    _, mid, _ = category_ctr_scores(long_range / "data", 300)
    _, full, _ = category_ctr_scores(long_range / "data", 2400)
    a = {k: auc(labels, s) for k, s in [("50", recent), ("300", mid), ("2400", full), ("oracle", p_true)]}
    assert a["2400"] > a["300"] + 0.02 > a["50"] + 0.02, a  # rises with the window, to thousands
    assert a["oracle"] > a["2400"], a


def test_p_true_and_exposure(long_range):
    log = pq.read_table(long_range / "log").to_pydict()
    p = np.array(log["p_true"])
    assert ((p > 0) & (p < 1)).all()
    assert abs(np.mean(log["label"]) - p.mean()) < 0.01  # labels are drawn from p_true
    # the last 50 events of a user rarely show the high-p_true interest; the first quarter often
    user = np.array(log["user_id"])
    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    n = np.diff(np.r_[first, len(user)])
    e = np.arange(len(user)) - np.repeat(first, n)
    early, last50 = e < np.repeat(n, n) // 4, e >= np.repeat(n, n) - 50
    assert (p[early] > 0.8).mean() > 5 * (p[last50] > 0.8).mean()


def test_window_ceilings_rise_with_the_window(long_range):
    from trainer.window_ceiling import window_ceilings

    w = window_ceilings(long_range / "data", [50, 300, 2400])
    assert list(w) == [0, 50, 300, 2400]
    # each longer window adds signal, to thousands of events back (seeded: 0.649 / 0.663 / 0.680 / 0.688)
    assert w[2400] > w[300] + 0.004 and w[300] > w[50] + 0.01 and w[50] > w[0] + 0.005, w

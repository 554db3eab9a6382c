import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score as auc

from feature_store.builder import BuildConfig, build
from feature_store.schema import read_log
from feature_store.synth import SynthConfig, synthesize


def test_seeded_and_contract_valid(tmp_path):
    cfg = SynthConfig(users=30, items=200, events_per_user=50, seed=3, chunk_events=500, rows_per_file=600)
    a = synthesize(cfg, tmp_path / "a", progress=False)
    synthesize(cfg, tmp_path / "b", progress=False)
    ta, tb = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert ta.equals(tb) and a["files"] > 1  # chunked, several files, still identical
    assert not ta.equals(
        read_log(
            synthesize(
                SynthConfig(users=30, items=200, events_per_user=50, seed=4), tmp_path / "c", progress=False
            )["out"]
        )
    )
    assert set(ta.column_names) == {"user_id", "item_id", "ts", "label", "category_id", "action", "p_true"}
    p = ta["p_true"].to_numpy()
    assert ((p > 0) & (p < 1)).all()
    lab, act = ta["label"].to_numpy(), ta["action"].to_numpy()
    assert set(act[lab == 0]) == {1} and set(act[lab == 1]) <= {2, 3}
    per_user = np.bincount(ta["user_id"].to_numpy())[1:]
    assert per_user.min() >= 25 and per_user.max() <= 100


def test_power_law_popularity(tmp_path):
    synthesize(
        SynthConfig(users=200, items=2000, events_per_user=200, seed=1), tmp_path / "log", progress=False
    )
    counts = np.sort(np.bincount(read_log(tmp_path / "log")["item_id"].to_numpy()))[::-1]
    top1 = counts[:20].sum() / counts.sum()
    assert top1 > 0.15  # the top 1% of items draw a large share (uniform would give 1%)
    assert counts[0] > 20 * np.median(counts[counts > 0])


@pytest.fixture(scope="module")
def long_log(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    synthesize(SynthConfig(users=150, items=3000, events_per_user=1200, seed=2), root / "log", progress=False)
    build(root / "log", root / "data", BuildConfig(max_len=2000, test_days=4), progress=False)
    return root / "data"


def category_ctr_scores(data, window):
    """Score each eval sample by the smoothed CTR of its category in the last `window` events."""
    seq = pq.read_table(data / "sequences").to_pydict()
    cat_of = {
        u: (np.array(c), np.array(lab)) for u, c, lab in zip(seq["user_id"], seq["category_id"], seq["label"])
    }
    ev = pq.read_table(data / "eval").to_pydict()
    scores = []
    for u, c, h in zip(ev["user_id"], ev["category_id"], ev["hist_len"]):
        cats, labels = cat_of[u]
        lo = max(0, h - window)
        same = cats[lo:h] == c
        scores.append((labels[lo:h][same].sum() + 0.4) / (same.sum() + 1.0))
    return np.array(ev["label"]), np.array(scores), np.array(ev["p_true"])


def test_long_history_carries_signal_the_recent_50_do_not(long_log):
    labels, short, p_true = category_ctr_scores(long_log, 50)
    _, long_, _ = category_ctr_scores(long_log, 2000)
    auc_short, auc_long, auc_oracle = auc(labels, short), auc(labels, long_), auc(labels, p_true)
    assert auc_long > auc_short + 0.02, (auc_short, auc_long)
    assert auc_oracle > auc_long
    assert auc_short > 0.55  # the short-term (drift) signal is real too

"""trainer.yardstick against a brute-force count of the same train split."""

from collections import Counter

import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score as auc

from trainer.yardstick import yardsticks


def test_yardsticks_match_brute_force(synth_dataset):
    train = pq.read_table(synth_dataset / "train", columns=["item_id", "label"]).to_pydict()
    ev = pq.read_table(synth_dataset / "eval", columns=["item_id", "label", "p_true"]).to_pydict()
    shown, clicks = (
        Counter(train["item_id"]),
        Counter(i for i, y in zip(train["item_id"], train["label"]) if y),
    )
    got = yardsticks(synth_dataset)
    assert got["n"] == len(ev["label"])
    assert abs(got["item_popularity_auc"] - auc(ev["label"], [shown[i] for i in ev["item_id"]])) < 1e-12
    ctr = [(clicks[i] + 1) / (shown[i] + 2) for i in ev["item_id"]]
    assert abs(got["item_ctr_auc"] - auc(ev["label"], ctr)) < 1e-12
    assert abs(got["oracle_auc"] - auc(ev["label"], ev["p_true"])) < 1e-12
    assert got["oracle_auc"] > max(got["item_ctr_auc"], got["item_popularity_auc"])

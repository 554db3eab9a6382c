import numpy as np
import pytest

from serving.replay.stats import bootstrap_diff, ndcg_at_k
from serving.replay.traffic import assign_arm, requests_from_log
from tests.conftest import write_log
from trainer.metrics import auc


def test_requests_group_a_users_window_in_time_order(tmp_path):
    log = {"user_id": [2, 1, 1, 1, 2, 1], "item_id": [5, 3, 4, 9, 6, 7], "ts": [100, 100, 100, 101, 100, 103],
           "label": [1, 0, 1, 0, 0, 1]}
    write_log(tmp_path / "log.parquet", log)
    reqs = requests_from_log(tmp_path / "log.parquet")
    assert [(r.user_id, r.ts, r.item_id) for r in reqs] == [(1, 100, (3, 4)), (2, 100, (5, 6)), (1, 101, (9,)),
                                                           (1, 103, (7,))]
    assert reqs[0].label == (0, 1)
    two = requests_from_log(tmp_path / "log.parquet", window_s=2)
    assert [(r.user_id, r.item_id) for r in two] == [(1, (3, 4, 9)), (2, (5, 6)), (1, (7,))]
    assert [r.ts for r in requests_from_log(tmp_path / "log.parquet", start=101, end=103)] == [101]
    with pytest.raises(ValueError, match="window_s"):
        requests_from_log(tmp_path / "log.parquet", window_s=0)


def test_arm_assignment_is_stable_salted_and_close_to_the_split():
    arms = [assign_arm(u, ["A", "B"], [70, 30]) for u in range(20_000)]
    assert arms == [assign_arm(u, ["A", "B"], [70, 30]) for u in range(20_000)]
    assert abs(arms.count("A") / len(arms) - 0.7) < 0.015
    other = [assign_arm(u, ["A", "B"], [70, 30], salt="exp-2") for u in range(20_000)]
    assert 0.3 < np.mean([x != y for x, y in zip(arms, other)]) < 0.5
    with pytest.raises(ValueError):
        assign_arm(1, ["A", "B"], [1])


def test_ndcg():
    assert ndcg_at_k([0, 1, 0], [0.1, 0.9, 0.2]) == 1.0
    assert ndcg_at_k([1, 0], [0.1, 0.9]) == pytest.approx(1 / np.log2(3))
    assert np.isnan(ndcg_at_k([0, 0], [0.3, 0.2]))


def arm(users, labels, scores):
    return {"user_id": users, "label": labels, "score": scores}


def auc_metric(cols, rows):
    return auc(cols["label"][rows], cols["score"][rows])


def test_bootstrap_ci_covers_a_known_difference_and_zero_for_identical_arms():
    rng = np.random.default_rng(0)
    n = 6000
    users = rng.integers(0, 400, n)
    labels = rng.integers(0, 2, n)
    noise = rng.normal(size=n)
    a = arm(users, labels, labels * 0.5 + noise)  # weaker model
    b = arm(users, labels, labels * 1.0 + noise)  # stronger model, paired
    true_diff = auc_metric(b, np.arange(n)) - auc_metric(a, np.arange(n))
    res = bootstrap_diff(a, b, auc_metric, n_boot=200)
    assert res["ci_low"] < true_diff < res["ci_high"] and res["ci_low"] > 0
    same = bootstrap_diff(a, arm(users, labels, a["score"].copy()), auc_metric, n_boot=200)
    assert same["diff"] == 0 and same["ci_low"] <= 0 <= same["ci_high"]

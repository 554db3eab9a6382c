import itertools

import numpy as np
import pytest

from serving.replay.stats import bootstrap_diff, ndcg_at_k
from serving.replay.traffic import assign_arm, requests_from_log
from tests.conftest import write_log
from trainer.metrics import auc


def test_requests_group_a_users_window_in_time_order(tmp_path):
    log = {
        "user_id": [2, 1, 1, 1, 2, 1],
        "item_id": [5, 3, 4, 9, 6, 7],
        "ts": [100, 100, 100, 101, 100, 103],
        "label": [1, 0, 1, 0, 0, 1],
    }
    write_log(tmp_path / "log.parquet", log)
    reqs = requests_from_log(tmp_path / "log.parquet")
    assert [(r.user_id, r.ts, r.item_id) for r in reqs] == [
        (1, 100, (3, 4)),
        (2, 100, (5, 6)),
        (1, 101, (9,)),
        (1, 103, (7,)),
    ]
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


def outcome(arm, index, user, labels, scores, latency=5.0):
    from serving.replay.driver import Outcome

    return Outcome(arm, index, user, 1_700_000_000 + index, tuple(labels), list(scores), "full", latency)


def test_ndcg_counts_only_ranking_requests_and_is_not_judged_on_few():
    from serving.replay.report import MIN_RANKING_REQUESTS, markdown, summarize

    rng = np.random.default_rng(0)
    outs = []
    for i in range(200):  # one-candidate and all-equal requests: no ranking information
        labels = [int(rng.integers(0, 2))] if i % 2 else [1, 1]
        for arm in "AB":
            outs.append(outcome(arm, i, i % 40, labels, rng.random(len(labels))))
    ranking = [(200 + i, [1, 0, 0]) for i in range(MIN_RANKING_REQUESTS - 1)]
    for i, labels in ranking:  # A ranks the positive last, B first
        outs += [
            outcome("A", i, i % 40, labels, [0.1, 0.5, 0.9]),
            outcome("B", i, i % 40, labels, [0.9, 0.5, 0.1]),
        ]
    s = summarize(outs, ["A", "B"], n_boot=50)
    assert s["arms"]["A"]["ranking_requests"] == s["arms"]["B"]["ranking_requests"] == len(ranking)
    assert s["arms"]["A"]["ndcg@10"] == pytest.approx(0.5) and s["arms"]["B"]["ndcg@10"] == 1.0
    nd = s["deltas"]["B-A"]["ndcg@10"]
    assert nd["ci_low"] is None and "too few ranking requests" in nd["verdict"]
    text = markdown(s, {"log": "x", "requests": 1, "assignment": "paired"})
    assert f"0.5000 ({len(ranking)})" in text and "too few ranking requests" in text
    assert "'No full encode' is the share of hit + incremental" in text  # the outcomes are explained
    assert s["arms"]["A"]["user_state"] == {"hit": 0, "incremental": 0, "full": 229, "bypass": 0}
    assert s["arms"]["A"]["no_full_encode_share"] == 0.0 and "| 0.00 | 0 / 0 / 229 / 0 |" in text
    i = 500  # one more ranking request: now judged, and B is better
    outs += [outcome("A", i, 7, [1, 0], [0.1, 0.9]), outcome("B", i, 7, [1, 0], [0.9, 0.1])]
    nd = summarize(outs, ["A", "B"], n_boot=50)["deltas"]["B-A"]["ndcg@10"]
    assert nd["ci_low"] > 0 and nd["verdict"] == "B better"


def test_verdicts_follow_each_metrics_direction():
    from serving.replay.report import verdict

    assert verdict("auc", 0.01, 0.02) == "B better" and verdict("logloss", 0.01, 0.02) == "B worse"
    assert (
        verdict("logloss", -0.02, -0.01) == "B better"
        and verdict("gauc", -0.01, 0.01) == "no clear difference"
    )


def _shown_tick_labels(fig, ax) -> list:
    """The x tick labels (major and minor) that are drawn: non-empty and inside the view."""
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [*ax.xaxis.get_major_ticks(), *ax.xaxis.get_minor_ticks()]
    return [
        t.label1 for t in ticks if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi
    ]


def _tick_labels_overlap(fig, ax) -> bool:
    boxes = [t.get_window_extent() for t in _shown_tick_labels(fig, ax)]
    boxes.sort(key=lambda b: b.x0)
    return any(a.x1 > b.x0 for a, b in itertools.pairwise(boxes))


@pytest.mark.parametrize("lo,hi", [(21.0, 34.0), (3.0, 40.0), (2.0, 300.0), (0.5, 4000.0), (0.05, 90000.0)])
def test_latency_axis_labels_do_not_overlap(lo, hi):
    import matplotlib.pyplot as plt

    from serving.replay.plots import latency_figure

    rng = np.random.default_rng(1)
    fig = latency_figure(
        {
            "A": np.exp(rng.uniform(np.log(lo), np.log(hi), 500)),
            "B": np.exp(rng.uniform(np.log(lo), np.log(hi), 500)),
        }
    )
    ax = fig.axes[0]
    assert len(_shown_tick_labels(fig, ax)) >= 2
    assert not _tick_labels_overlap(fig, ax)
    plt.close(fig)


def test_deltas_plot_right_is_better_for_every_metric():
    import matplotlib.pyplot as plt

    from serving.replay.plots import deltas_figure

    deltas = {
        "B-A": {
            "auc": {"diff": 0.01, "ci_low": 0.005, "ci_high": 0.02},
            "logloss": {"diff": -0.03, "ci_low": -0.04, "ci_high": -0.02},
            "ndcg@10": {"diff": None, "ci_low": None, "ci_high": None},
        }
    }
    fig = deltas_figure(deltas)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    x = ax.lines[0].get_xdata()
    assert "sign flipped" in labels[1] and x[1] == pytest.approx(0.03)  # lower LogLoss plotted as a gain
    assert x[0] == pytest.approx(0.01) and "not judged" in labels[2] and np.isnan(x[2])
    assert "B better" in ax.get_xlabel()
    plt.close(fig)


def test_calibration_uses_quantile_bins_with_counts():
    import matplotlib.pyplot as plt

    from serving.replay.plots import MAX_CALIBRATION_BINS, calibration_figure

    rng = np.random.default_rng(2)
    p = rng.beta(2, 5, 3000)
    rows = {"label": (rng.random(3000) < p).astype(int), "logit": np.log(p / (1 - p))}
    fig = calibration_figure({"A": rows})
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"A: {MAX_CALIBRATION_BINS} quantile bins, 200 candidates each" in legend
    plt.close(fig)


def test_replay_refuses_an_existing_report_before_sending_anything(tmp_path):
    from feature_store.io import OutputExistsError
    from serving.replay.run import run_replay

    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_replay(
            str(tmp_path / "no-log"), str(out), arms_http=["A=http://127.0.0.1:9", "B=http://127.0.0.1:9"]
        )
    assert (out / "report.md").read_text() == "an earlier report"


def test_bootstrap_keeps_what_a_full_replay_of_the_history_would(tmp_path):
    """Only each user's last max_len events are appended, and the store ends up as if every
    earlier event had been."""
    from feature_store.online import Event, OnlineStore, connect, stop_embedded
    from serving.replay.run import bootstrap_store
    from serving.replay.traffic import by_user_then_time, log_columns

    rng = np.random.default_rng(3)
    n = 3000
    log = {
        "user_id": rng.integers(0, 30, n),
        "item_id": rng.integers(0, 50, n),
        "ts": 1_700_000_000 + rng.integers(0, 500, n),
        "label": rng.integers(0, 2, n),
        "category_id": rng.integers(0, 5, n),
        "action": rng.integers(0, 3, n),
    }
    path = write_log(tmp_path / "log.parquet", log)
    client = connect(None)
    try:
        trimmed, full = (
            OnlineStore(client, max_len=7, prefix="trim"),
            OnlineStore(client, max_len=7, prefix="full"),
        )
        appended = bootstrap_store(trimmed, path, 1_700_000_400)
        cols = log_columns(path)
        rows = by_user_then_time(cols, np.flatnonzero(cols["ts"] < 1_700_000_400))
        full.append(
            [
                Event(
                    *(int(cols[c][i]) for c in ("user_id", "item_id", "ts", "category_id", "action", "label"))
                )
                for i in rows
            ]
        )
        assert appended == 30 * 7 < len(rows)
        for u in range(30):
            assert full.read(u)[0].tolist() == trimmed.read(u)[0].tolist()
    finally:
        stop_embedded(client, save=False)


def test_replay_sends_the_columns_each_arm_declares(tmp_path):
    """Item 6 of issue 15: a logged request's candidate, dense and context columns go to an arm
    whose bundle declares them, and nothing undeclared (which the arm would answer 422)."""
    from serving.replay.driver import score_body

    log = {
        "user_id": [1, 1, 2],
        "item_id": [3, 4, 5],
        "ts": [100, 100, 100],
        "label": [1, 0, 0],
        "category_id": [7, 8, 9],
        "brand": [11, 12, 13],
        "device": [2, 2, 3],
        "price": [1.5, 2.5, 3.5],
        "tags": [[1, 2], [], [3]],
    }
    write_log(tmp_path / "log.parquet", log)
    req = requests_from_log(tmp_path / "log.parquet")[0]
    spec = {
        "candidate": ["category_id", "brand", "tags"],
        "dense": ["price"],
        "context": ["device"],
        "user": [],
    }
    assert score_body(req, spec) == {
        "user_id": 1,
        "ts": 100,
        "candidates": [
            {"item_id": 3, "category_id": 7, "brand": 11, "tags": [1, 2], "price": 1.5},
            {"item_id": 4, "category_id": 8, "brand": 12, "tags": [], "price": 2.5},
        ],
        "context": {"device": 2},
    }
    assert score_body(req, None) == {  # a default-spec arm: today's body
        "user_id": 1,
        "ts": 100,
        "candidates": [{"item_id": 3, "category_id": 7}, {"item_id": 4, "category_id": 8}],
    }

"""Three-state verdicts from paired, user-resampled, seed-pooled AUC differences (bench/verdict.py)
and the bench's claims built on them (bench/claims.py)."""

import numpy as np
import pytest

from bench.claims import comparison, config_key
from bench.verdict import _SortedAUC, combine, paired_delta, stack_seeds, verdict
from longer.config import ModelConfig
from trainer.metrics import auc

USERS, PER_USER = 300, 20


def _eval_set(seed=0):
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(USERS), PER_USER)
    signal = rng.normal(size=len(user))
    label = (signal + rng.normal(size=len(user)) > 1.0).astype(np.int64)
    return user, label, signal


def _arm(strengths, seed=1):
    """One variant with one seed per strength: logit = strength · signal + noise."""
    user, label, signal = _eval_set()
    rng = np.random.default_rng([seed, 1])  # not the eval set's stream
    preds = [
        {
            "row_id": np.arange(len(user)),
            "user_id": user,
            "label": label,
            "logit": k * signal + rng.normal(size=len(user)),
        }
        for k in strengths
    ]
    return stack_seeds(preds)


def test_sorted_auc_equals_the_exact_auc_on_resamples_with_duplicates_and_ties():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, 500)
    logit = np.round(rng.normal(size=(500, 2)), 1)  # many ties
    fast = _SortedAUC(label, logit)
    for _ in range(5):
        rows = rng.integers(0, 500, 500)
        want = np.mean([auc(label[rows], logit[rows, s]) for s in (0, 1)])
        assert fast(rows, np.array([0, 1])) == pytest.approx(want, abs=1e-12)
        assert fast(rows, np.array([1, 1])) == pytest.approx(auc(label[rows], logit[rows, 1]), abs=1e-12)


def test_verdict_states_and_their_combination():
    assert verdict(0.001, 0.01, 0.0) == "agrees"
    assert verdict(-0.01, -0.003, -0.002) == "disagrees"
    assert verdict(-0.003, 0.01, -0.002) == "inconclusive"
    assert verdict(float("nan"), 0.01, 0.0) == "inconclusive"
    assert combine(["agrees", "agrees"]) == "agrees"
    assert combine(["agrees", "inconclusive"]) == "inconclusive"
    assert combine(["inconclusive", "disagrees"]) == "disagrees"


def test_clearly_better_agrees_clearly_worse_disagrees_noisy_is_inconclusive():
    base = _arm([1.0, 1.0, 1.0], seed=1)
    better = _arm([2.0, 2.0, 2.0], seed=2)
    worse = _arm([0.4, 0.4, 0.4], seed=3)
    # one stuck seed, two good ones: the mean is above the base, the seeds disagree wildly
    noisy = _arm([0.6, 2.0, 2.0], seed=4)
    got = {}
    for name, b in {"better": better, "worse": worse, "noisy": noisy}.items():
        d = paired_delta(base, b, n_boot=300)
        got[name] = (d, verdict(d["ci_low"], d["ci_high"], 0.0))
    assert got["better"][1] == "agrees", got["better"]
    assert got["worse"][1] == "disagrees", got["worse"]
    d, state = got["noisy"]
    assert d["diff"] > 0, d  # the old rule (mean difference against the std) would call it a win
    assert state == "inconclusive", d
    # without the seed resampling the same data looks decisive: the interval is the seeds' doing
    one_seed = {**noisy, "logit": noisy["logit"][:, 1:]}
    d1 = paired_delta(base, one_seed, n_boot=300)
    assert verdict(d1["ci_low"], d1["ci_high"], 0.0) == "agrees"


def test_paired_delta_refuses_variants_scored_on_different_samples():
    a, b = _arm([1.0]), _arm([1.0])
    b["row_id"] = b["row_id"] + 1
    with pytest.raises(ValueError, match="different eval samples"):
        paired_delta(a, b, n_boot=10)
    with pytest.raises(ValueError, match="seeds of a variant"):
        stack_seeds([{**_arm([1.0]), "logit": np.zeros(USERS * PER_USER)}, {**b, "logit": b["logit"][:, 0]}])


def _row(table, variant, gflops, auc_=0.8):
    cfg = {"table": table, "variant": variant}  # a stand-in config: one key per row
    return {"table": table, "variant": variant, "auc": auc_, "gflops": gflops, "config": cfg}


def test_comparison_claims_follow_the_intervals():
    base = ModelConfig(max_len=512, merge_k=8, query_k=100)
    strength = {
        ("baselines", "transformer"): 1.0,
        ("baselines", "longer"): 2.0,
        ("baselines", "din"): 1.0,
        ("queries", "all (512) recent"): 1.0,
        ("queries", "k=100 recent"): 2.0,
        ("queries", "k=100 uniform"): 1.0,
        ("queries", "k=100 learnable"): 0.4,
        ("merge", "K=1 (no merge)"): 1.0,
        ("merge", "K=8 inner_trans"): 1.0,
    }
    flops = {"transformer": 4.0, "all (512) recent": 2.0, "K=1 (no merge)": 3.0}
    rows = [_row(t, v, flops.get(v, 1.0)) for t, v in strength]
    arms = {
        config_key(r["config"]): _arm([k] * 3, seed=i)
        for i, (r, k) in enumerate(zip(rows, strength.values()))
    }
    got = {c["claim"]: c["verdict"] for c in comparison(rows, base, arms, n_boot=200)}
    assert len(got) == 5
    # the merge pair is the same strength: "matches" within 0.002 cannot be shown either way
    assert [v for k, v in got.items() if k.startswith("token merge")] == ["inconclusive"]
    assert all(v == "agrees" for k, v in got.items() if not k.startswith("token merge")), got
    # LONGER as costly as the transformer: the FLOPs half of the claim fails
    rows[1]["gflops"] = 5.0
    again = {c["claim"]: c for c in comparison(rows, base, arms, n_boot=50)}
    first = next(c for k, c in again.items() if k.startswith("LONGER matches"))
    assert first["verdict"] == "disagrees" and "not cheaper" in first["ours"]


def test_every_row_gets_its_paired_delta_against_the_base():
    from bench.verdict import deltas_vs

    rows = [_row("baselines", "longer", 1.0), _row("baselines", "din", 0.1), _row("phd", "R=1", 1.0)]
    rows[2]["config"] = rows[0]["config"]  # the base appears in two tables
    arms = {
        config_key(rows[0]["config"]): _arm([2.0] * 2, seed=1),
        config_key(rows[1]["config"]): _arm([1.0] * 2, seed=2),
    }
    deltas_vs(rows, config_key(rows[0]["config"]), arms, lambda r: config_key(r["config"]), n_boot=100)
    assert rows[0]["delta_vs_base"] is None and rows[2]["delta_vs_base"] is None
    d = rows[1]["delta_vs_base"]
    assert d["ci_low"] <= d["diff"] <= d["ci_high"] < 0  # DIN is weaker than the base here


def test_features_rows_are_their_own_arms():
    """The features table has rows with the same model config and different [features]
    (LONGER without / with features), and a base whose config differs: each row's delta is taken
    against its own arm (keyed by model and features), not the model config's alone."""
    from bench.claims import row_key, variant_key
    from bench.verdict import deltas_vs

    feats = {"user": ["age_bucket"]}
    longer_cfg, base_cfg = {"arch": "longer"}, {"arch": "base"}
    rows = [
        {"table": "features", "variant": "base", "config": base_cfg, "features": feats},
        {"table": "features", "variant": "LONGER without", "config": longer_cfg, "features": None},
        {"table": "features", "variant": "LONGER with", "config": longer_cfg, "features": feats},
    ]
    arms = {
        variant_key(base_cfg, feats): _arm([0.5] * 2, seed=1),
        variant_key(longer_cfg): _arm([1.0] * 2, seed=2),
        variant_key(longer_cfg, feats): _arm([2.0] * 2, seed=3),
    }
    deltas_vs(rows, variant_key(longer_cfg), arms, row_key, n_boot=100)
    assert rows[1]["delta_vs_base"] is None
    assert rows[0]["delta_vs_base"]["diff"] < 0 < rows[2]["delta_vs_base"]["diff"]

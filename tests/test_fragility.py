"""`longer bench fragility` (bench/fragility.py): its figures, and that recording leaves training alone."""

import json
import math

import numpy as np
import pytest

from bench.fragility import (
    FIXED_BUDGET,
    attention_stats,
    embedding_table,
    module_group,
    parse_variant,
    user_offsets,
)
from longer.errors import UsageError
from tests import test_trainer
from tests.test_trainer import last_metrics, run, train

small = test_trainer.small  # the trainer tests' dataset (a module fixture)


def test_module_groups_name_every_part_of_longer():
    from longer.recmodel import build_model
    from trainer.config import RunConfig

    model = build_model(RunConfig.load("configs/quality.toml").model)
    groups = {module_group(f"model.{n}") for n, _ in model.net.named_parameters(prefix="net")}
    assert groups == {
        "CLS token",
        "user-token proj",
        "tokenizer",
        "InnerTrans",
        "merge proj",
        "layer 1 (cross-causal)",
        "layer 2 (self-causal)",
        "head",
    }
    assert [embedding_table(k) for k in ("hist_item_id", "item_id", "hist_action", "user_id")] == [
        "item",
        "item",
        "action",
        "user",
    ]


def _users(rng, n_users=200, per_user=40):
    users = np.repeat(np.arange(n_users), per_user)
    rate = rng.normal(-1.5, 1.0, n_users)  # per-user click-rate logits
    within = rng.normal(0, 1.0, len(users))  # per-sample signal
    p = 1 / (1 + np.exp(-(rate[users] + within)))
    return users, (rng.random(len(users)) < p).astype(np.int8), rate, within


def test_user_offsets_tell_right_offsets_from_random_ones():
    rng = np.random.default_rng(0)
    users, labels, rate, within = _users(rng)
    right = user_offsets(users, labels, rate[users] + within)
    wrong_offset = rng.normal(0, 1.0, len(rate))
    wrong = user_offsets(users, labels, wrong_offset[users] + within)
    assert right["offset_corr"] > 0.7 and abs(wrong["offset_corr"]) < 0.2
    assert right["auc_offset_only"] > 0.65 and abs(wrong["auc_offset_only"] - 0.5) < 0.05
    # within-user ranking is the same signal in both: the centred AUCs agree
    assert right["auc_centred"] == pytest.approx(wrong["auc_centred"], abs=1e-9)
    assert right["offset_std"] == pytest.approx(float(np.std(rate)), rel=0.1)
    # the train split's click rates (other samples of the same users) do the same without eval labels
    t_users, t_labels, _, _ = _users(np.random.default_rng(1))
    t_labels = (np.random.default_rng(2).random(len(t_users)) < 1 / (1 + np.exp(-rate[t_users]))).astype(int)
    fixed = user_offsets(users, labels, wrong_offset[users] + within, train=(t_users, t_labels))
    assert fixed["offset_corr_train"] < 0.2 and fixed["auc_train_offset"] > wrong["auc"] + 0.05


def test_attention_stats_of_uniform_and_peaked_attention():
    B, H, Q, T = 3, 2, 2, 6
    visible = np.ones((B, Q, T), bool)
    visible[:, :, 4:] = False  # 4 visible keys, the first 2 global
    uniform = np.where(visible[:, None], 0.25, 0.0)
    s = attention_stats(uniform, visible, n_global=2)
    assert s["entropy"] == pytest.approx([math.log(4)] * 2)
    assert s["norm_entropy"] == pytest.approx([1.0, 1.0]) and s["global_mass"] == pytest.approx([0.5, 0.5])
    peaked = np.zeros((B, H, Q, T))
    peaked[..., 0] = 1.0  # everything on the first global key
    s = attention_stats(peaked, visible, n_global=2)
    assert s["entropy"] == pytest.approx([0.0, 0.0]) and s["global_mass"] == pytest.approx([1.0, 1.0])


def test_variants_replace_the_budget_they_change():
    overrides, init = parse_variant("base")
    assert overrides == list(FIXED_BUDGET) and init == {}
    overrides, init = parse_variant("converged")
    assert "train.steps=3000" in overrides and "train.steps=100" not in overrides and init == {}
    overrides, init = parse_variant("user_std0.1")
    assert overrides == list(FIXED_BUDGET) and init == {"user_std": "0.1"}
    with pytest.raises(UsageError, match="unknown variant 'nope'"):
        parse_variant("nope")


@pytest.mark.slow
def test_recording_leaves_the_run_alone_and_init_variants_change_the_weights(small, tmp_path):
    """The recorded base run ends where a plain `longer train` of the same config does; every
    module gets a gradient; user_std0.1 starts the user table at a tenth of the scale."""
    steps = ("train.steps=8", "train.batch_size=64", "model.user_buckets=1031")
    out = tmp_path / "frag"
    cmd = ["bench", "fragility", "--data", small / "data", "--config", small / "run.toml", "--out", out]
    run([*cmd, "--variants", "base,user_std0.1", "--seeds", "0", "--probe-every", "4", "--quiet", *steps])
    result = json.loads((out / "fragility.json").read_text())
    base, small_user = result["runs"]
    assert [p["step"] for p in base["probes"]] == [0, 4, 8] and len(base["train_loss"]) == 8
    g = base["probes"][1]["grad_norm"]
    assert all(
        g[k] > 0 for k in ("CLS token", "user-token proj", "InnerTrans", "head", "emb:user", "emb:item")
    )
    assert 0 <= g["clipped"] <= 1 and base["probes"][0]["attention"]["global_mass_cls"] > 0
    rms0 = base["probes"][0]["emb_rms"]["user"], small_user["probes"][0]["emb_rms"]["user"]
    assert rms0[0] == pytest.approx(1.0, abs=0.2) and rms0[1] == pytest.approx(0.1, abs=0.03)

    plain = tmp_path / "plain"
    fixed = [*FIXED_BUDGET, *steps, "train.seed=0", "train.threads=1", "train.log_every=1000000"]
    fixed = [o for o in fixed if o != "train.steps=100"]
    train(small, plain, *fixed)
    assert base["final"]["auc"] == pytest.approx(last_metrics(plain)["auc"], abs=1e-6)
    assert (out / "fragility.png").stat().st_size > 10_000 and "| base |" in (
        out / "fragility.md"
    ).read_text()

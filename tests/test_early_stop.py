"""Validation split carved from the end of train by time, and early stopping (trainer/early_stop.py)."""

import json
import shutil

import numpy as np
import pytest

from feature_store.builder import read_meta
from feature_store.loader import BatchLoader
from tests import test_trainer
from tests.test_trainer import train, weights
from trainer.config import ConfigError, RunConfig, TrainConfig
from trainer.early_stop import EarlyStop, val_start

small = test_trainer.small  # the trainer tests' dataset (a module fixture), here too


def _collect(loader):
    rows, ts, ok = [], [], True
    for b in loader:
        rows.append(b.row_id.numpy())
        ts.append(b.ts.numpy())
        # every history event strictly before its sample (point in time)
        lens = b.hist_lengths.numpy()
        owner = np.repeat(np.arange(len(lens)), lens)
        ok &= bool((b.hist_ts.numpy() < b.ts.numpy()[owner]).all())
    return np.concatenate(rows), np.concatenate(ts), ok


@pytest.mark.parametrize("how", ["val_frac=0.25", "val_days=3"])
def test_val_split_is_disjoint_later_than_train_and_point_in_time(synth_dataset, how):
    key, value = how.split("=")
    tc = TrainConfig(**{key: float(value)})
    meta = read_meta(synth_dataset)
    val_ts = val_start(synth_dataset, meta, tc)
    train = BatchLoader(synth_dataset, "train", batch_size=256, max_len=64, ts_range=(None, val_ts))
    val = BatchLoader(
        synth_dataset, "train", batch_size=256, max_len=64, shuffle=False, ts_range=(val_ts, None)
    )
    everything = BatchLoader(synth_dataset, "train", batch_size=256, max_len=64, shuffle=False)
    t_rows, t_ts, t_ok = _collect(train)
    v_rows, v_ts, v_ok = _collect(val)
    all_rows, _, _ = _collect(everything)
    assert t_ok and v_ok
    assert t_ts.max() < val_ts <= v_ts.min()  # validation is the end of train, by time
    assert not set(t_rows) & set(v_rows)  # no validation sample is a training target
    assert sorted(np.r_[t_rows, v_rows]) == sorted(all_rows)  # and together they are the train split
    assert len(t_rows) == train.num_rows and len(v_rows) == val.num_rows
    if key == "val_frac":
        assert abs(len(v_rows) / len(all_rows) - 0.25) < 0.05
    else:
        assert val_ts == meta["split"]["split_ts"] - 3 * 86400


def test_val_split_must_leave_samples_on_both_sides(synth_dataset):
    with pytest.raises(ConfigError, match="must leave samples on both sides"):
        val_start(synth_dataset, read_meta(synth_dataset), TrainConfig(val_days=10_000))


@pytest.mark.parametrize(
    "train, message",
    [
        ({"early_stop": 3, "eval_every": 5}, "needs a validation split"),
        ({"early_stop": 3, "val_frac": 0.1}, "eval_every >= 1"),
        ({"val_frac": 0.1, "val_days": 2}, "not both"),
        ({"val_frac": 1.0}, "val_frac must be in [0, 1)"),
    ],
)
def test_bad_early_stop_settings_are_refused(train, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        RunConfig.from_dict({"train": train})


def test_early_stop_triggers_after_patience_evals_without_improvement():
    stop = EarlyStop(patience=2)
    assert stop.update(10, 0.60) and stop.update(20, 0.65)
    assert not stop.update(30, 0.65) and not stop.should_stop  # equal is no improvement
    assert stop.update(40, 0.66) and stop.bad_evals == 0  # a new best resets the count
    assert not stop.update(50, 0.64) and not stop.update(60, 0.655)
    assert stop.should_stop and (stop.best, stop.best_step) == (0.66, 40)
    again = EarlyStop(patience=2)
    again.load_state_dict(json.loads(json.dumps(stop.state_dict())))
    assert again == stop
    never = EarlyStop(patience=0)
    for i in range(10):
        never.update(i, 0.5)
    assert not never.should_stop and never.best_step == 0


ES_FLAGS = (
    "train.val_frac=0.2",
    "train.eval_every=1",
    "train.early_stop=2",
    "train.steps=40",
    "train.deterministic=true",
)


@pytest.mark.slow
def test_early_stopped_run_exports_its_best_validation_weights(small, tmp_path):
    import torch

    from trainer.evaluate import metrics_of, predict_split
    from trainer.export import load_bundle

    out = tmp_path / "run"
    summary = json.loads(train(small, out, *ES_FLAGS).stdout)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x["split"] == "val"]
    assert summary["stopped_early"] and summary["steps"] < 40, summary
    assert [x["step"] for x in val] == list(range(1, summary["steps"] + 1))
    best = max(val, key=lambda x: x["auc"])
    assert summary["best_step"] == best["step"] < summary["steps"] and summary["val_auc"] == best["auc"]
    assert all("train_loss" in x for x in val) and summary["wall_s"] > 0
    assert lines[-1]["split"] == "eval" and lines[-1]["best_step"] == best["step"]
    # the bundle holds the best step's weights: its validation AUC is the best one, not the last
    bundle = load_bundle(out / "export")
    tc = RunConfig.from_dict(json.loads((out / "config.json").read_text())).train
    val_ts = val_start(small / "data", read_meta(small / "data"), tc)
    loader = BatchLoader(
        small / "data", "train", batch_size=512, max_len=64, shuffle=False, ts_range=(val_ts, None)
    )
    got = metrics_of(predict_split(bundle.model, loader, torch.device("cpu")))
    assert got["auc"] == pytest.approx(best["auc"], abs=1e-6) != val[-1]["auc"]
    # only the checkpoints a resume or the export needs are kept
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == [f"step-{best['step']:08d}", f"step-{summary['steps']:08d}"]


@pytest.mark.slow
def test_early_stop_resumes_exactly(small, tmp_path):
    """Killed after its step-4 checkpoint and resumed, an early-stopping run stops at the same
    step, with the same best step and the same exported weights."""

    flags = (*ES_FLAGS, "train.checkpoint_every=4")
    full = tmp_path / "full"
    ref = json.loads(train(small, full, *flags).stdout)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for p in (cut / "checkpoints").iterdir():
        if int(p.name.split("-")[1]) > 4:
            shutil.rmtree(p)
    shutil.rmtree(cut / "export")
    got = json.loads(train(small, cut, *flags, resume=True).stdout)
    for k in ("steps", "best_step", "val_auc", "stopped_early"):
        assert got[k] == ref[k], k
    a, b = weights(full), weights(cut)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, cut)]
    assert [(x["step"], x["split"]) for x in lines[0]] == [(x["step"], x["split"]) for x in lines[1]]
    for x, y in zip(*lines):
        assert x["auc"] == pytest.approx(y["auc"], abs=1e-6) and x["gauc"] == pytest.approx(
            y["gauc"], abs=1e-6
        )

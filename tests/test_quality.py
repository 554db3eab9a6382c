"""Short training runs that must learn something real (subprocesses, one CPU process each)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score as auc

from feature_store.builder import BuildConfig, build
from feature_store.importers import import_movielens
from feature_store.synth import SynthConfig, synthesize
from tests.conftest import shared_dataset
from tests.test_trainer import run, run_toml

pytestmark = pytest.mark.slow

FAST_LEARNING = "lr = 5e-3\nwarmup_steps = 20\nemb_lr = 0.2"


def train_and_eval(tmp_path, data, **fmt) -> dict:
    (tmp_path / "run.toml").write_text(run_toml(**fmt, train_extra=FAST_LEARNING))
    summary = json.loads(
        run(
            ["train", "--config", tmp_path / "run.toml", "--data", data, "--out", tmp_path / "run", "--quiet"]
        ).stdout
    )
    return summary["eval"]


def test_synthetic_run_reaches_most_of_the_oracle_lift(tmp_path):
    synthesize(
        SynthConfig(users=300, items=300, events_per_user=120, seed=3), tmp_path / "log", progress=False
    )
    build(tmp_path / "log", tmp_path / "data", BuildConfig(max_len=64, test_days=5), progress=False)
    ev = pq.read_table(tmp_path / "data" / "eval", columns=["label", "p_true"]).to_pydict()
    oracle = auc(ev["label"], ev["p_true"])
    got = train_and_eval(tmp_path, tmp_path / "data", max_len=64, steps=700, batch=128)
    assert got["auc"] - 0.5 >= 0.6 * (oracle - 0.5), (got["auc"], oracle)


def test_movielens_beats_item_popularity(tmp_path):
    import_movielens(shared_dataset("ml-latest-small"), tmp_path / "log", progress=False)
    build(tmp_path / "log", tmp_path / "data", BuildConfig(max_len=128, test_days=365), progress=False)
    train = pq.read_table(tmp_path / "data" / "train", columns=["item_id"]).column("item_id").to_numpy()
    ev = pq.read_table(tmp_path / "data" / "eval", columns=["item_id", "label"]).to_pydict()
    popularity = np.bincount(train, minlength=int(max(ev["item_id"])) + 1)[np.array(ev["item_id"])]
    baseline = auc(ev["label"], popularity)
    got = train_and_eval(tmp_path, tmp_path / "data", max_len=128, steps=150, batch=256)
    assert got["auc"] > baseline + 0.05, (got["auc"], baseline)

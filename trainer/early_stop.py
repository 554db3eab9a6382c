"""Validation split and early stopping: `train.val_days` / `train.val_frac`, `train.early_stop`.

The validation split is the end of the train split by time: the train samples with ts ≥ val_ts,
where val_ts = split_ts − val_days · 1 day (`val_days`) or the ts of the latest `val_frac` of
the train samples (`val_frac`). The trainer then trains only on samples with ts < val_ts, so
no validation sample is ever a training target; and every sample's history is its user's
events strictly before its own ts (the builder's hist_len), so validation histories are
point-in-time correct and no training history reaches into the validation period.

`EarlyStop` keeps the best validation AUC and its step, and says stop after `patience`
evaluations without improvement. Its state travels in checkpoints (`state_dict`), so a resumed
run stops where the uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .config import ConfigError, TrainConfig

DAY = 86400
METRIC = "auc"  # what "better on validation" means: the paper's metric


def _train_ts(data: Path) -> np.ndarray:
    parts = sorted((data / "train").glob("part-*.parquet"))
    return np.concatenate([pq.read_table(p, columns=["ts"]).column("ts").to_numpy() for p in parts] or [[]])


def val_start(data: str | Path, meta: dict, tc: TrainConfig) -> int | None:
    """val_ts: the first timestamp of the validation split (None without one)."""
    if not (tc.val_days or tc.val_frac):
        return None
    ts = _train_ts(Path(data))
    if tc.val_days:
        what, val_ts = f"train.val_days={tc.val_days}", int(meta["split"]["split_ts"] - tc.val_days * DAY)
    else:
        what = f"train.val_frac={tc.val_frac}"
        val_ts = int(np.sort(ts)[min(len(ts) - 1, math.floor(len(ts) * (1 - tc.val_frac)))]) if len(ts) else 0
    n_val = int((ts >= val_ts).sum())
    if n_val == 0 or n_val == len(ts):
        raise ConfigError(
            f"{what}: the validation split (ts >= {val_ts}) holds {n_val} of the {len(ts)} train "
            f"samples of {data}; it must leave samples on both sides"
        )
    return val_ts


@dataclass
class EarlyStop:
    """Best validation metric so far; stop after `patience` evals without improvement (0: never)."""

    patience: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, step: int, value: float) -> bool:
        """Record one validation eval; True when it is a new best."""
        if self.best is None or value > self.best:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]

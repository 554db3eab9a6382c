"""Yardsticks for an eval AUC: what simple scores reach on the same dataset's eval split.

    item_popularity_auc   score = the candidate item's number of train-split events (how often it
                          was shown before the split); below 0.5 where popular items are clicked
                          less than the rest
    item_ctr_auc          score = the item's train-split click rate, smoothed (clicks + 1) /
                          (events + 2): a non-personalised baseline that knows each item's appeal
    oracle_auc            score = the log's own click probability `p_true` (synthetic logs only;
                          None otherwise): the best any model can do on this log

`python -m trainer.yardstick DATA` prints them as JSON; `--windows 64,256,1024` adds
`window_auc`, what count features of the last L events reach (trainer/window_ceiling.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .metrics import auc


def yardsticks(data: str | Path) -> dict:
    data = Path(data)
    train = pq.read_table(data / "train", columns=["item_id", "label"])
    names = pq.read_schema(next((data / "eval").glob("*.parquet"))).names
    ev = pq.read_table(
        data / "eval", columns=["item_id", "label"] + (["p_true"] if "p_true" in names else [])
    )
    t_item, t_label = train.column("item_id").to_numpy(), train.column("label").to_numpy()
    e_item, e_label = ev.column("item_id").to_numpy(), ev.column("label").to_numpy()
    items, t_idx = np.unique(t_item, return_inverse=True)
    shown = np.bincount(t_idx, minlength=len(items)).astype(np.float64)
    clicks = np.bincount(t_idx, weights=t_label.astype(np.float64), minlength=len(items))
    pos = np.clip(np.searchsorted(items, e_item), 0, max(len(items) - 1, 0))
    known = (items[pos] == e_item) if len(items) else np.zeros(len(e_item), bool)
    e_shown = np.where(known, shown[pos] if len(items) else 0.0, 0.0)
    e_clicks = np.where(known, clicks[pos] if len(items) else 0.0, 0.0)
    return {
        "item_popularity_auc": auc(e_label, e_shown),
        "item_ctr_auc": auc(e_label, (e_clicks + 1) / (e_shown + 2)),
        "oracle_auc": auc(e_label, ev.column("p_true").to_numpy()) if "p_true" in names else None,
        "n": len(e_label),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a dataset directory from `longer build`")
    p.add_argument("--windows", help="comma-separated history windows L for window_auc (e.g. 64,256,1024)")
    a = p.parse_args()
    out = yardsticks(a.data)
    if a.windows:
        from .window_ceiling import window_ceilings

        out["window_auc"] = window_ceilings(a.data, [int(w) for w in a.windows.split(",")])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

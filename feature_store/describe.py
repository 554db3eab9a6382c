"""`python -m feature_store.describe DATA`: a human summary of a dataset and of one batch."""

from __future__ import annotations

import argparse
from pathlib import Path

from .builder import read_meta


def describe(data: str | Path, max_len: int | None = None, batch_size: int = 4) -> str:
    from .loader import BatchLoader

    meta = read_meta(data)
    rows, split = meta["rows"], meta["split"]
    hist = meta["hist_len"]["log2_histogram"]
    lines = [
        f"dataset {data}",
        f"  events {rows['events']:,}  users {rows['users']:,}  items {meta['cardinalities']['item_id']['distinct']:,}",
        f"  train {rows['train']:,} samples  eval {rows['eval']:,} samples  (eval = ts >= {split['split_ts']})",
        f"  sequence columns {', '.join(meta['columns']['sequence'])}; longest history {meta['hist_len']['max']:,}",
        "  hist_len histogram (log2 buckets): "
        + " ".join(f"<{2 ** (i + 1) - 1}:{n}" for i, n in enumerate(hist)),
    ]
    loader = BatchLoader(data, "train", batch_size=batch_size, max_len=max_len, seed=0)
    b = next(iter(loader))
    lines += [
        f"one train batch (batch_size={batch_size}, max_len={loader.max_len}):",
        f"  KeyedJaggedTensor keys {b.sparse.keys()}",
        f"  history lengths {b.hist_lengths.tolist()}  labels {b.labels.tolist()}",
        f"  candidate item_id {b.sparse['item_id'].values().tolist()}  user_id {b.sparse['user_id'].values().tolist()}",
        f"  dense {sorted(b.dense)}",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("data")
    p.add_argument("--max-len", type=int)
    a = p.parse_args()
    print(describe(a.data, a.max_len))


if __name__ == "__main__":
    main()

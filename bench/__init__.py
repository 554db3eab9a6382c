"""Benchmarks that print JSON (`longer bench ...`)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

# The model shape of the train and serve benchmarks (README's tables): d 64, 2 layers, K 8 +
# InnerTrans, 100 recent queries, 100,003-row item and user tables.
BENCH_SHAPE = dict(
    d_model=64,
    n_heads=4,
    n_layers=2,
    emb_dim=32,
    merge_k=8,
    merge="inner_trans",
    query_k=100,
    item_buckets=100_003,
    user_buckets=100_003,
)


def machine() -> dict:
    from trainer.threads import cpu_budget

    return {
        "cpus": os.cpu_count(),
        "cpu_budget": cpu_budget(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_atomic(path: str | Path, text: str) -> None:
    """`text` into `path` whole or not at all: written beside it, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finish(result: dict, out: str | None) -> dict:
    """Write the result JSON to `out` (if given) and return it for printing."""
    if out:
        write_atomic(out, json.dumps(result, indent=2) + "\n")
    return result


def median_seconds(fn, steps: int, seconds: float) -> float:
    """Median wall time of `fn()` after one warm-up call: at least `steps` calls, more while
    `seconds` last (at most 10 × steps)."""
    fn()
    times = []
    t_end = time.perf_counter() + seconds
    while len(times) < steps or (time.perf_counter() < t_end and len(times) < 10 * steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]

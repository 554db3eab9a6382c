"""Scores/s of concurrent `ModelRuntime.score` calls in one process, the candidate side eager
and traced (serving/traced.py), alone and beside a thread that parses /v1/score bodies a fifth
of the time, as a server's event loop does under load (what the GIL costs a scoring thread).

    .venv/bin/python scripts/score_concurrency.py [--L 2000] [--candidates 500] [--seconds 3] [--repeats 3]

Prints one JSON object: per setting, the median over repeats of each thread's scores/s and
their sum. bench/serve.py's bundle shape, random weights; 1 torch thread a call (serving's
default, LONGER_CALL_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def setup(L: int, n: int):
    from bench.serve import _bundle
    from serving.runtime import CandidateColumns, ModelRuntime
    from serving.traced import _events

    _, bundle = _bundle(Path(tempfile.mkdtemp()), L)
    eager, traced = ModelRuntime(str(bundle), threads=2, trace=False), ModelRuntime(str(bundle), threads=2)
    assert traced.traced, "the candidate side did not trace"
    events = _events(eager, L, 0)
    ts = int(events["ts"][-1]) + 60
    rng = np.random.default_rng(0)
    items, cats = rng.integers(0, 100_000, n).tolist(), rng.integers(0, 500, n).tolist()
    body = json.dumps(
        {
            "user_id": 1,
            "candidates": [{"item_id": i, "category_id": c} for i, c in zip(items, cats)],
            "ts": ts,
        }
    )
    cols = CandidateColumns(items, {"category_id": cats})
    return {
        name: (rt, rt.encode(1, events), rt.candidates(cols, {}, ts)[0])
        for name, rt in (("eager", eager), ("traced", traced))
    }, (eager, body.encode())


def run(workers, seconds: float) -> list[float]:
    stop, counts = threading.Event(), [0] * len(workers)

    def loop(i, fn):
        while not stop.is_set():
            fn()
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i, fn)) for i, fn in enumerate(workers)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return [c / seconds for c in counts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--L", type=int, default=2000)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    paths, (rt, body) = setup(a.L, a.candidates)

    def parse_a_fifth():  # 1 ms of parsing in every 5
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1e-3:
            rt.models.score.model_validate_json(body)
        time.sleep(4e-3)

    settings = {}
    for name, (r, state, cands) in paths.items():
        score = lambda r=r, s=state, c=cands: r.score(s, c)  # noqa: E731
        settings |= {
            f"{name}, 1 thread": [score],
            f"{name}, 2 threads": [score, score],
            f"{name}, 2 threads + parsing": [score, score, parse_a_fifth],
        }
    rows = {k: [] for k in settings}
    for _ in range(a.repeats):
        for k, workers in settings.items():
            rows[k].append(run(workers, a.seconds))
    out = {}
    for k, runs in rows.items():
        scorers = [x[:2] if "2 threads" in k else x[:1] for x in runs]
        out[k] = {
            "scores_per_s_each": [round(statistics.median(col), 1) for col in zip(*scorers)],
            "scores_per_s_total": round(statistics.median(sum(x) for x in scorers), 1),
        }
    print(
        json.dumps(
            {
                "L": a.L,
                "candidates": a.candidates,
                "seconds": a.seconds,
                "repeats": a.repeats,
                "results": out,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

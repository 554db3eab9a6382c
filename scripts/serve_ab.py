"""Before/after `longer bench serve` side by side, on one machine at one time (issue 18).

Each repeat runs, for tree A then tree B (each a checkout of this repository, on its own
PYTHONPATH, with this venv): the serve bench restricted to `--cells` (bench/serve.py's full
sizes otherwise; the naive unsplit forward skipped), and the in-process `score` of the same
model, state and candidates at 1 torch thread (wall and thread-CPU ms). It prints, per cell,
the medians over repeats of each tree's figures and the ratios B ÷ A, as JSON.

    .venv/bin/python scripts/serve_ab.py --a /work/base --b . --repeats 3 --out bench-out/serve-ab.json

A tree only needs `bench.serve` with `bench_length`; the child processes (the bench's
`longer serve` included) inherit PYTHONPATH, so each serves its own tree's code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = """
import json, sys
import bench.serve as s
s._naive = lambda *a, **k: [1e-3]  # skipped: not what A/B compares
cells = json.loads(sys.argv[1])
s.FULL = dict(s.FULL, cells={int(L): tuple(ns) for L, ns in cells.items()}, reps=int(sys.argv[2]))
print(json.dumps(s.main(out=sys.argv[3])["results"]))
"""

SCORE_1T = """
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
from bench.batches import random_batch
from bench.serve import SHAPE
from longer.config import ModelConfig
from longer.interface import Candidates
from longer.recmodel import build_model
L, n, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
m = build_model(ModelConfig(max_len=L, **SHAPE)).eval()
with torch.inference_mode():
    state = m.encode_user(random_batch([L], seed=1, items=100_000, categories=500))
    g = torch.Generator().manual_seed(n)
    c = Candidates(item_id=torch.randint(0, 100_000, (1, n), generator=g),
                   category_id=torch.randint(0, 500, (1, n), generator=g), ts=torch.tensor([2_000_000_000]))
    wall, cpu = [], []
    for i in range(reps + 2):
        t0, c0 = time.perf_counter(), time.thread_time()
        m.score(state, c)
        if i >= 2:
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.thread_time() - c0) * 1e3)
print(json.dumps({"wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu)}))
"""


def child(tree: str, code: str, *args) -> object:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{tree}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def figures(row: dict) -> dict:
    """The figures compared, from one bench row."""
    tp = {t["clients"]: t for t in row["throughput"]}
    return {
        "hit_p50_ms": row["hit"]["p50_ms"],
        "hit_p99_ms": row["hit"]["p99_ms"],
        "in_process_score_p50_ms": row["in_process_score"]["p50_ms"],
        "hit_overhead_x": row["hit_overhead_x"],
        **(
            {"hit_overhead_x_columnar": row["hit_overhead_x_columnar"]}
            if "hit_overhead_x_columnar" in row
            else {}
        ),
        "throughput_8_over_1_x": row["throughput_8_over_1_x"],
        "rps_1": tp[1]["requests_per_s"],
        "rps_8": tp[8]["requests_per_s"],
        "p99_8_clients_ms": tp[8]["p99_ms"],
        **(
            {"server_cpu_ms_per_request_1": tp[1]["server_cpu_ms_per_request"]}
            if "server_cpu_ms_per_request" in tp[1]
            else {}
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="the 'before' tree")
    ap.add_argument("--b", required=True, help="the 'after' tree")
    ap.add_argument("--cells", default="2000x500,1000x100", help="LxN,... (history length x candidates)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reps", type=int, default=30, help="timed hits per cell and form")
    ap.add_argument("--score-reps", type=int, default=15, help="timed in-process scores at 1 thread")
    ap.add_argument("--out")
    args = ap.parse_args()
    cells: dict[int, list[int]] = {}
    for cell in args.cells.split(","):
        L, n = map(int, cell.split("x"))
        cells.setdefault(L, []).append(n)
    runs: dict[str, dict[str, list]] = {"a": {}, "b": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for side, tree in (("a", args.a), ("b", args.b)):
                rows = child(tree, BENCH, json.dumps(cells), args.reps, f"{tmp}/{side}{r}.json")
                for row in rows:
                    key = f"L{row['L']}xN{row['candidates']}"
                    figs = figures(row)
                    one = child(tree, SCORE_1T, row["L"], row["candidates"], args.score_reps)
                    figs |= {"score_1thread_wall_ms": one["wall_ms"], "score_1thread_cpu_ms": one["cpu_ms"]}
                    runs[side].setdefault(key, []).append(figs)
                print(json.dumps({"repeat": r, "side": side, "runs": runs[side]}), file=sys.stderr)
    result = {
        "a": args.a,
        "b": args.b,
        "repeats": args.repeats,
        "load_average": list(os.getloadavg()),
        "cells": {},
    }
    for key in runs["a"]:
        med = {
            side: {f: round(statistics.median(x[f] for x in runs[side][key]), 2) for f in runs[side][key][0]}
            for side in "ab"
        }
        ratio = {f: round(med["b"][f] / med["a"][f], 3) for f in med["a"] if f in med["b"] and med["a"][f]}
        result["cells"][key] = {"a_median": med["a"], "b_median": med["b"], "b_over_a": ratio}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Incremental user-state update against a full encode (append-stable LONGER, longer/stable.py):
`update_user(state, n new events)` vs `encode_user(all events)` for one user, at L = 1,000
and 2,000, after 1 and after 10 new events, in one process, the calls interleaved so a busy
machine slows both alike. Also timed: the part of an update that recomputes the user-side
queries (global tokens + k most recent through every layer), which an update cannot avoid.
Medians of wall time and of process CPU time (one torch thread: the CPU time is the work done,
robust to a machine shared with other jobs, where wall time also counts waiting for a core).

    python -m bench.update [--quick] [--out FILE.json]     (JSON on stdout)
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from bench import finish, machine
from bench.serve import SHAPE


def bench_length(L: int, news, reps: int) -> list[dict]:
    from bench.batches import random_batch, split_batch
    from longer.config import ModelConfig
    from longer.interface import UserState
    from longer.recmodel import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(max_len=L, encoding="append_stable", **SHAPE)).eval()
    total = L + 37  # the window has slid: the last group is partial
    h = split_batch(random_batch([total], seed=1, items=100_000, categories=500))[0][0]

    def batch(lo, hi, upto):
        part = {k: v[lo:hi] for k, v in h.items()}
        return random_batch([hi - lo], hist=[part], users=[4242], totals=[upto], ts=[h["ts"][-1] + 60])

    full = batch(total - L, total, total)
    rows = []
    with torch.no_grad():
        for n in news:
            before = model.encode_user(batch(total - n - L, total - n, total - n))
            new = batch(total - n, total, total)
            state = model.update_user(before, new)
            net = model.net
            emb = model.embedding(full.sparse)
            glob = net.global_tokens(emb, 1)
            gk, gv = state["k0"][:, :, 2:], state["v0"][:, :, 2:]
            one = UserState(dict(state.tensors))
            calls = {
                "encode": lambda: model.encode_user(full),
                "update": lambda: model.update_user(before, new),  # noqa: B023
                "queries": lambda: net._layers(one, glob, gk, gv),  # noqa: B023
            }
            wall = {k: [] for k in calls}
            cpu = {k: [] for k in calls}
            for _ in range(reps):  # interleaved, so load on the machine slows all three alike
                for k, fn in calls.items():
                    w0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    cpu[k].append((time.process_time() - c0) * 1e3)
                    wall[k].append((time.perf_counter() - w0) * 1e3)
            row = {"L": L, "new_events": n, "reps": reps}
            for clock, t in (("wall", wall), ("cpu", cpu)):
                med = {k: statistics.median(v) for k, v in t.items()}
                row[clock] = {
                    "encode_ms": round(med["encode"], 2),
                    "update_ms": round(med["update"], 2),
                    "update_over_encode": round(med["update"] / med["encode"], 3),
                    "queries_ms": round(med["queries"], 2),
                    "queries_share_of_update": round(med["queries"] / med["update"], 2),
                }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def main(quick: bool = False, out: str | None = None) -> dict:
    torch.set_num_threads(1)  # process CPU time = the work of one call
    reps = 5 if quick else 21
    rows = [r for L in (1000, 2000) for r in bench_length(L, (1, 10), reps)]
    result = {
        "benchmark": "update",
        "quick": quick,
        "model": SHAPE | {"encoding": "append_stable"},
        "torch_threads": torch.get_num_threads(),
        "machine": machine(),
        "results": rows,
    }
    return finish(result, out)


if __name__ == "__main__":
    args = sys.argv[1:]
    out = args[args.index("--out") + 1] if "--out" in args else None
    print(json.dumps(main(quick="--quick" in args, out=out), indent=2))

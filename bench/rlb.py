"""`rlb_speedup` of `longer bench train`: training samples/s with request-level batching ÷
without it (STCA, arXiv 2511.06077), same model, same samples.

A synthetic log with `IMPRESSIONS` impressions per request is built at L = `MAX_LEN`; batches
of `REQUESTS` shuffled requests are assembled twice from the same rows: once per request (the
history stored and encoded once, `train.rlb = true`) and once per sample (every impression
encodes its own copy). A worker process with one thread (OMP_NUM_THREADS=1) times a
forward+backward step of each, alternating, and reports medians.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

IMPRESSIONS = 10
MAX_LEN = 1000
REQUESTS = 8  # per batch: ~80 samples of up to 1,000 events each


def batches(work: Path, quick: bool, n: int) -> list[tuple]:
    """n (per-request batch, per-sample batch) pairs holding the same samples."""
    from feature_store.builder import BuildConfig, build
    from feature_store.loader import BatchLoader
    from feature_store.synth import SynthConfig, synthesize

    synthesize(
        SynthConfig(
            users=20 if quick else 60,
            items=20_000,
            events_per_user=2 * MAX_LEN,
            impressions_per_request=IMPRESSIONS,
            seed=0,
        ),
        work / "log",
        progress=False,
    )
    build(work / "log", work / "data", BuildConfig(max_len=MAX_LEN, test_days=2), progress=False)
    loader = BatchLoader(work / "data", "train", batch_size=REQUESTS, max_len=MAX_LEN, requests=True)
    out = []
    for cols, sizes in loader.units(epoch=0):
        for i in range(0, len(sizes) - REQUESTS + 1, REQUESTS):
            s = sizes[i : i + REQUESTS]
            lo = int(sizes[:i].sum())
            part = {c: v[lo : lo + int(s.sum())] for c, v in cols.items()}
            out.append((loader.assemble(part, s), loader.assemble(part)))
            if len(out) == n:
                return out
    return out


def worker(work: str, quick: bool) -> dict:
    import torch

    from bench.train import config
    from longer.recmodel import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    reps = 3 if quick else 5
    pairs = batches(Path(work), quick, reps)
    model = build_model(config("longer", MAX_LEN)).train()

    def seconds(batch) -> float:
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        loss.backward()
        return time.perf_counter() - t

    seconds(pairs[0][0]), seconds(pairs[0][1])  # warm-up
    rate = {"rlb": [], "per_sample": []}
    for with_rlb, per_sample in pairs:  # side by side, alternating
        rate["rlb"].append(with_rlb.batch_size / seconds(with_rlb))
        rate["per_sample"].append(per_sample.batch_size / seconds(per_sample))
    med = {k: sorted(v)[len(v) // 2] for k, v in rate.items()}
    return {
        "L": MAX_LEN,
        "impressions_per_request": IMPRESSIONS,
        "requests_per_batch": REQUESTS,
        "samples_per_batch": [p[1].batch_size for p in pairs],
        "mean_history": round(float(pairs[0][1].hist_lengths.float().mean()), 1),
        "samples_per_s_rlb": round(med["rlb"], 2),
        "samples_per_s_per_sample": round(med["per_sample"], 2),
        "rlb_speedup": round(med["rlb"] / med["per_sample"], 2),
        "repeats": len(pairs),
        "torch_threads": torch.get_num_threads(),
    }


def rlb_speedup(work: Path, quick: bool) -> dict:
    """Run `worker` in a fresh one-thread process; its JSON row."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "bench.rlb", str(work), str(int(quick))],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    if r.returncode:
        raise RuntimeError(f"bench rlb worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], bool(int(sys.argv[2])))))

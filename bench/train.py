"""`longer bench train`: forward+backward samples/s and peak memory, `longer` vs `transformer`,
the trainer end to end with 1 and 2 processes, and `rlb_speedup` (request-level batching,
bench/rlb.py).

Each (arch, L) runs in its own fresh process (so its peak RSS is its own), one after the
other in one invocation, on identical random batches of full-length histories. The config is
the paper's shape (K = 8 with InnerTrans, 100 recent queries) at d_model 64.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import BENCH_SHAPE, finish, machine, median_seconds
from bench.rlb import rlb_speedup
from trainer.threads import configure_threads, cpu_budget, env_threads

LENGTHS = (512, 2000, 8000)
TOKENS_PER_BATCH = 16_000  # batch size = max(1, TOKENS_PER_BATCH // L), the same for both models
BASE = BENCH_SHAPE | {"query_select": "recent", "norm": "hybrid"}


def config(arch: str, L: int):
    from longer.config import ModelConfig

    return ModelConfig(arch=arch, max_len=L, **BASE)


def worker(arch: str, L: int, steps: int, seconds: float) -> dict:
    import torch

    from bench.batches import random_batch
    from longer.flops import forward_flops
    from longer.recmodel import build_model

    configure_threads(env_threads(), "LONGER_THREADS", log=False)
    torch.manual_seed(0)
    cfg = config(arch, L)
    m = build_model(cfg).train()
    B = max(1, TOKENS_PER_BATCH // L)
    batch = random_batch([L] * B, seed=0, items=100_000, categories=500)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        m.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(batch), batch.labels)
        loss.backward()

    median = median_seconds(step, steps, seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "arch": arch,
        "L": L,
        "batch_size": B,
        "ms_per_step": round(median * 1e3, 1),
        "samples_per_s": round(B / median, 2),
        "gflops_fwd_per_sample": round(forward_flops(cfg) / 1e9, 3),
        "peak_rss_mib": round(peak / 1024),
        "step_extra_rss_mib": round((peak - rss0) / 1024),
        "torch_threads": torch.get_num_threads(),
    }


E2E_RUN = """
[model]
max_len = 256
d_model = 64
n_heads = 4
n_layers = 2
emb_dim = 32
merge_k = 8
query_k = 64
item_buckets = 100003
category_buckets = 512
user_buckets = 100003

[train]
steps = {steps}
batch_size = {batch}
eval_batch_size = 2048
log_every = 10
"""


def end_to_end(work: Path, quick: bool) -> list[dict]:
    """`longer train` on a synthetic dataset with 1 process and with 2 (torchrun, gloo): the
    trainer's own samples/s (pipeline, sharded embeddings, fused optimizer, all included)."""
    from feature_store.builder import BuildConfig, build
    from feature_store.synth import SynthConfig, synthesize

    synthesize(
        SynthConfig(users=200 if quick else 1000, items=20_000, events_per_user=600, seed=0),
        work / "log",
        progress=False,
    )
    build(work / "log", work / "data", BuildConfig(max_len=256, test_days=2), progress=False)
    steps = 20 if quick else 100
    rows = []
    for procs in (1, 2):
        batch = 256 // procs  # the same global batch
        (work / "run.toml").write_text(E2E_RUN.format(steps=steps, batch=batch))
        args = [
            "--config",
            str(work / "run.toml"),
            "--data",
            str(work / "data"),
            "--out",
            str(work / f"run{procs}"),
            "--quiet",
            "train.sharding=row_wise",
        ]
        cmd = (
            [sys.executable, "-m", "longer_cli", "train", *args]
            if procs == 1
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={procs}",
                "-m",
                "trainer",
                *args,
            ]
        )
        threads = max(1, cpu_budget() // procs)  # procs × threads ≤ the CPUs this process may use
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        r = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1]
        )
        if r.returncode:
            raise RuntimeError(f"end-to-end train with {procs} process(es) failed:\n{r.stderr[-3000:]}")
        summary = json.loads(r.stdout)
        rows.append(
            {
                "processes": procs,
                "threads_per_process": threads,
                "global_batch": batch * procs,
                "steps": steps,
                "train_samples_per_s": summary["train_samples_per_s"],
                "eval_auc": round(summary["eval"]["auc"], 4),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(quick: bool = False, out: str | None = None, workdir: str | None = None) -> dict:
    steps, seconds = (2, 5.0) if quick else (5, 30.0)
    rows = []
    for L in LENGTHS:
        for arch in ("longer", "transformer"):
            r = subprocess.run(
                [sys.executable, "-m", "bench.train", "--worker", arch, str(L), str(steps), str(seconds)],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            )
            if r.returncode:
                raise RuntimeError(f"bench train worker {arch} L={L} failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        e2e = end_to_end(Path(tmp), quick)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        rlb = rlb_speedup(Path(tmp), quick)
    print(json.dumps(rlb), file=sys.stderr)
    by = {(r["arch"], r["L"]): r for r in rows}
    result = {
        "benchmark": "train",
        "quick": quick,
        "config": BASE,
        "machine": machine(),
        "results": rows,
        "trainer_end_to_end": e2e,
        "rlb": rlb,
        "rlb_speedup": rlb["rlb_speedup"],
        "longer_over_transformer_samples_per_s": {
            str(L): round(by["longer", L]["samples_per_s"] / by["transformer", L]["samples_per_s"], 2)
            for L in LENGTHS
        },
        "transformer_over_longer_flops": {
            str(L): round(
                by["transformer", L]["gflops_fwd_per_sample"] / by["longer", L]["gflops_fwd_per_sample"], 2
            )
            for L in LENGTHS
        },
    }
    return finish(result, out)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs=4, metavar=("ARCH", "L", "STEPS", "SECONDS"))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.worker:
        arch, L, steps, seconds = a.worker
        print(json.dumps(worker(arch, int(L), int(steps), float(seconds))))
    else:
        print(json.dumps(main(quick=a.quick), indent=2))

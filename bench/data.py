"""`longer bench data`: builder throughput and peak memory, loader throughput by max_len.

Builder: a synthetic log is built in a child process (so its peak RSS is the builder's own),
at two log sizes with the same bucket size, to show that memory follows the bucket, not the
log. Loader: samples/s on one core (torch and BLAS threads = 1, no prefetch thread) at
max_len 100, 1000, 4000 over users with ~8,000 events, so long histories are really long.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import finish, machine

FULL = {"users": 1250, "items": 50_000, "events_per_user": 8000, "bucket_rows": 2_000_000}
QUICK = {"users": 150, "items": 20_000, "events_per_user": 8000, "bucket_rows": 400_000}


def _child(args: list[str]) -> tuple[dict, float, float]:
    """Run `longer ...` in a fresh process; return its JSON, wall seconds and peak RSS (MiB)."""
    code = (
        "import resource, sys, json\nfrom longer_cli.main import main\nrc = main(sys.argv[1:])\n"
        "print(json.dumps({'maxrss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), "
        "file=sys.stderr)\nsys.exit(rc)\n"
    )
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"longer {' '.join(args)} failed:\n{r.stderr}")
    rss = json.loads(r.stderr.strip().splitlines()[-1])["maxrss_kib"] / 1024
    return json.loads(r.stdout), wall, rss


def bench_build(work: Path, size: dict, users: int) -> dict:
    log, data = work / f"log-{users}", work / f"data-{users}"
    synth, synth_s, synth_rss = _child(
        [
            "synth",
            "--users",
            str(users),
            "--items",
            str(size["items"]),
            "--events-per-user",
            str(size["events_per_user"]),
            "--seed",
            "0",
            "--out",
            str(log),
            "--quiet",
            "--overwrite",
        ]
    )
    meta, wall, rss = _child(
        [
            "build",
            "--log",
            str(log),
            "--out",
            str(data),
            "--max-len",
            "4000",
            "--test-days",
            "3",
            "--bucket-rows",
            str(size["bucket_rows"]),
            "--quiet",
            "--overwrite",
        ]
    )
    seq_bytes = sum(f.stat().st_size for f in (data / "sequences").iterdir())
    return {
        "events": synth["rows"],
        "synth_rows_per_s": round(synth["rows"] / synth_s),
        "synth_peak_rss_mib": round(synth_rss),
        "build_seconds": round(wall, 2),
        "build_rows_per_s": round(meta["rows"]["events"] / wall),
        "build_peak_rss_mib": round(rss),
        "buckets": meta["build"]["buckets"],
        "sequences_mib": round(seq_bytes / 2**20, 1),
        "data_dir": str(data),
    }


def bench_loader(data: Path, max_len: int, batch_size: int = 1024, seconds: float = 4.0) -> dict:
    import torch

    from feature_store.loader import BatchLoader, SequenceStore

    torch.set_num_threads(1)
    seqs = SequenceStore(data, ("item_id", "category_id", "action"))
    loader = BatchLoader(data, "train", batch_size=batch_size, max_len=max_len, seed=0, sequences=seqs)
    n = values = 0
    it = iter(loader)
    next(it)  # first window read outside the clock
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    for batch in it:
        n += batch.batch_size
        values += int(batch.hist_lengths.sum())
        if time.perf_counter() - t0 > seconds:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "max_len": max_len,
        "batch_size": batch_size,
        "samples_per_s": round(n / wall),
        "mean_history": round(values / n, 1),
        "history_events_per_s": round(values / wall),
        "cpu_seconds_per_wall_second": round(cpu / wall, 2),
    }


def main(quick: bool = False, out: str | None = None, workdir: str | None = None) -> dict:
    size = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        work = Path(tmp)
        small = bench_build(work, size, size["users"] // 4)
        big = bench_build(work, size, size["users"])
        loader = [
            bench_loader(Path(big["data_dir"]), L, seconds=2.0 if quick else 5.0) for L in (100, 1000, 4000)
        ]
        for b in (small, big):
            b.pop("data_dir")
    result = {
        "benchmark": "data",
        "quick": quick,
        "machine": machine(),
        "builder": [small, big],
        "builder_rss_growth": round(big["build_peak_rss_mib"] / max(small["build_peak_rss_mib"], 1), 2),
        "builder_log_growth": round(big["events"] / small["events"], 2),
        "loader_one_core": loader,
    }
    return finish(result, out)


if __name__ == "__main__":
    print(json.dumps(main(quick="--quick" in sys.argv), indent=2))

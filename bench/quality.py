"""`longer bench quality`: the LONGER paper's tables (arXiv 2505.04421, §4) on public data.

Every variant trains with the same budget — the config's `[train]` table (steps, batch,
learning rates, schedule) is shared by every model and nothing is tuned per model — on the
dataset's time split, once per seed. A row reports eval AUC, GAUC and LogLoss (mean ± std over
seeds), the analytic forward GFLOPs per sample, train samples/s (forward + backward on
identical batches of full-length histories) and serving candidates/s on the hit path
(`score` against a cached UserState), the last two measured one variant at a time after all
training, so no run competes with another for the cores.

    baselines  Table 1: sumpool, din_recent50, din, hstu, transformer, longer
    merge      Table 2, token merge: K ∈ {1, 4, 8} × {concat, inner_trans}
    queries    Table 2, queries: k ∈ {all, k₀, k₀/2, k₀/5} × {recent, uniform, learnable},
               k₀ = the config's query_k (the paper's 100 at L = 2000: scale it with L)
    norms      block norms: pre, post, hybrid (HybridNorm), hybrid_star (HybridNorm*)
    phd        PHD copies R ∈ {1, 2, 3}
    scaling    AUC against max_len and against GFLOPs, with a power-law fit AUC = α·xᵝ

A variant that appears in several tables (the base LONGER is in all of them) trains once.
Finished runs are journalled in `DIR/runs.jsonl` under a key of (dataset, config, seed), so
an interrupted bench resumes where it stopped and a rerun reuses what it has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from bench import machine, median_seconds
from bench.claims import PAPER, comparison, config_key, row_key, variant_key
from bench.curves import curve_of, plot_curves
from bench.train import TOKENS_PER_BATCH
from bench.verdict import N_BOOT, RULE, deltas_vs, stack_seeds
from trainer.threads import configure_threads, cpu_budget, env_threads

PAPER_TABLES = ("baselines", "merge", "queries", "norms", "phd", "scaling", "features")
TABLE_TITLES = {
    "baselines": "Table 1 analogue: sequence baselines",
    "merge": "Table 2 analogue: token merge",
    "queries": "Table 2 analogue: query number and selection (layer-1 cross-causal queries)",
    "norms": "Block norm (HybridNorm)",
    "phd": "PHD copies per candidate token",
    "scaling": "Scaling with sequence length",
    "features": "Table 1's Base → LONGER with the dataset's own features (the config's [features])",
}
BASELINES = ("base", "sumpool", "din_recent50", "din", "hstu", "transformer", "longer")
# Archs the scaling table may compare against LONGER (`--scaling-archs`; default LONGER alone).
# The full transformer's self-attention is O(L²): on a CPU it runs only up to TRANSFORMER_MAX_LEN.
# DIN (recent 50) reads the latest 50 events at any max_len: one row, at the longest length.
SCALING_ARCHS = ("longer", "transformer", "din", "din_recent50")
TRANSFORMER_MAX_LEN = 1024
SERVE_CANDIDATES = 500


@dataclass(frozen=True)
class Variant:
    table: str
    label: str
    model: object  # longer.config.ModelConfig
    features: dict | None = None  # the run's [features] table (None: the default spec)

    @property
    def key(self) -> str:
        return variant_key(self.model.to_dict(), self.features)


def default_lengths(base_len: int, data_len: int, quick: bool) -> list[int]:
    """Doubling max_len from 32 up to the dataset's max_len (at most 2048), always with the base's."""
    top = min(data_len, 2048)
    lengths = {base_len}
    x = 32
    while x <= top:
        lengths.add(x)
        x *= 2
    lengths = sorted(L for L in lengths if top >= L)
    if quick:  # the shortest, the base and the longest
        lengths = sorted({lengths[0], base_len, lengths[-1]})
    return lengths


def variants(
    base,
    lengths: list[int],
    quick: bool = False,
    tables=PAPER_TABLES,
    features: dict | None = None,
    scaling_archs=("longer",),
) -> list[Variant]:
    """The rows of every table, each a full ModelConfig derived from `base` (a LONGER config);
    `features`, the config's [features] table, feeds the features table's rows; `scaling_archs`,
    the archs of the scaling table (see SCALING_ARCHS)."""
    L, k0, K0 = base.max_len, base.query_k, base.merge_k
    out: list[Variant] = []

    def add(table: str, label: str, **kw) -> None:
        if table in tables:
            out.append(Variant(table, label, base.replace(**kw)))

    for m in BASELINES:
        add("baselines", m, arch=m)
    merges = [(1, "concat"), (4, "concat"), (4, "inner_trans"), (8, "concat"), (8, "inner_trans")]
    if quick:
        merges = [(1, "concat"), (4, "inner_trans"), (8, "concat"), (8, "inner_trans")]
    for K, how in merges:
        if L % K == 0:
            add("merge", "K=1 (no merge)" if K == 1 else f"K={K} {how}", merge_k=K, merge=how)
    add("queries", f"all ({L}) recent", query_k=L, query_select="recent")
    ks = [k0] if quick else sorted({k0, max(1, k0 // 2), max(1, round(k0 / 5))}, reverse=True)
    for k in ks:
        for sel in ("recent", "uniform", "learnable"):
            add("queries", f"k={k} {sel}", query_k=k, query_select=sel)
    for norm in ("pre", "post", "hybrid", "hybrid_star"):
        add("norms", norm, norm=norm)
    for R in (1, 2) if quick else (1, 2, 3):
        add("phd", f"R={R}", phd_copies=R)
    for arch in scaling_archs:
        for n in scaling_lengths(arch, lengths):
            if arch != "longer":
                add("scaling", f"{arch} L={n}", arch=arch, max_len=n)
            elif n % K0 == 0:
                add("scaling", f"L={n}", max_len=n, query_k=min(k0, n))
    if "features" in tables and features:
        out += [
            Variant("features", "base (no sequence), with features", base.replace(arch="base"), features),
            Variant("features", "LONGER without features", base),
            Variant("features", "LONGER with features", base, features),
        ]
    return out


def scaling_lengths(arch: str, lengths: list[int]) -> list[int]:
    """The scaling table's lengths for one arch (see SCALING_ARCHS)."""
    if arch == "din_recent50":
        return lengths[-1:]
    if arch == "transformer":
        return [n for n in lengths if n <= TRANSFORMER_MAX_LEN]
    return lengths


def scaling_fits(rows: list[dict]) -> dict[str, dict]:
    """Power-law fits of the scaling table per arch: {arch: {"max_len": fit, "gflops": fit}}
    (a fit is None with fewer than 3 lengths)."""
    out = {}
    for arch in dict.fromkeys(r["arch"] for r in rows if r["table"] == "scaling"):
        sc = [r for r in rows if r["table"] == "scaling" and r["arch"] == arch]
        out[arch] = {
            axis: power_law([r[axis] for r in sc], [r["auc"] for r in sc]) for axis in ("max_len", "gflops")
        }
    return out


# --- training (worker processes) ------------------------------------------------------------------


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch loads; the trainer honours it
    import torch

    torch.set_num_threads(threads)


def _train_one(cfg: dict, data: str, run_dir: str, preds: str) -> dict:
    """One training run in this worker: the real trainer (TorchRec sharding, pipeline, fused
    optimizer, exact eval), in-process. Its per-sample eval predictions are kept at `preds`
    (the paired verdicts need them); the rest of its run directory is removed afterwards."""
    from trainer.config import RunConfig
    from trainer.train import train

    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the sharding plan, per run
            summary = train(RunConfig.from_dict(cfg), data, run_dir, progress=False)
        tmp = Path(preds).with_name(f".{Path(preds).name}.partial")
        shutil.copyfile(Path(run_dir) / "predictions.parquet", tmp)
        tmp.replace(preds)
        curve = curve_of(run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    ev = summary["eval"]
    return {
        "auc": ev["auc"],
        "gauc": ev["gauc"],
        "logloss": ev["logloss"],
        "calibration": ev["calibration"],
        "eval_samples": ev["n"],
        "trainer_samples_per_s": summary["train_samples_per_s"],
        "steps": summary["steps"],  # trained (early stopping: fewer than the budget)
        "best_step": summary["best_step"],  # the weights evaluated (None without a validation split)
        "val_auc": summary["val_auc"],
        "curve": curve,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def preds_path(out: Path, key: str) -> Path:
    return out / "predictions" / f"{key}.parquet"


def load_arm(out: Path, keys: list[str]) -> dict:
    """The eval predictions of one variant's runs (one key per seed), stacked over seeds."""
    import pyarrow.parquet as pq

    cols = ["row_id", "user_id", "label", "logit"]
    return stack_seeds([pq.read_table(preds_path(out, k), columns=cols).to_pydict() for k in keys])


def _read_journal(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run: that run trains again
    return done


def train_all(
    plan: list[tuple[str, dict, int]], data: Path, out: Path, jobs: int, progress: bool
) -> dict[str, dict]:
    """Train every (key, config, seed) not already in the journal; returns key → record."""
    from tqdm import tqdm

    journal = out / "runs.jsonl"
    (out / "predictions").mkdir(exist_ok=True)
    # a run is done when it is journalled and its predictions are kept
    done = {k: r for k, r in _read_journal(journal).items() if preds_path(out, k).is_file()}
    todo = [(k, c, s) for k, c, s in plan if k not in done]
    threads = max(1, cpu_budget() // jobs)  # jobs × threads ≤ the CPUs this process may use
    bar = tqdm(
        total=len(plan), initial=len(plan) - len(todo), desc="quality runs", unit="run", disable=not progress
    )
    scratch = Path(tempfile.mkdtemp(prefix="runs-", dir=out))
    try:
        with (
            ProcessPoolExecutor(
                max_workers=jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(threads,),
            ) as pool,
            open(journal, "a") as jf,
        ):
            futures = {
                pool.submit(_train_one, c, str(data), str(scratch / k), str(preds_path(out, k))): (k, c, s)
                for k, c, s in todo
            }
            for f in as_completed(futures):
                k, c, s = futures[f]
                try:
                    rec = {
                        "key": k,
                        "seed": s,
                        "model": c["model"],
                        "features": c.get("features"),
                        **f.result(),
                    }
                except Exception as e:
                    raise RuntimeError(f"run {c['model']['arch']} (seed {s}, key {k}) failed: {e}") from e
                done[k] = rec
                jf.write(json.dumps(rec) + "\n")
                jf.flush()
                bar.set_postfix(last=f"{c['model']['arch']} auc={rec['auc']:.4f}")
                bar.update(1)
    finally:
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return done


# --- throughput (one variant at a time, all cores) ------------------------------------------------


def throughput(cfg, device: str, seconds: float, spec=None) -> dict:
    """Train samples/s (forward + backward) and hit-path candidates/s of an untrained model of
    `cfg` over a resolved `spec` (None: the default), on random full-length histories (speed
    does not depend on the weights)."""
    import torch

    from bench.batches import random_batch, spec_batch, spec_candidates, spec_samples
    from longer.interface import Candidates
    from longer.recmodel import build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(cfg, spec).to(dev)
    L = cfg.max_len
    B = max(1, TOKENS_PER_BATCH // L)
    if spec is not None:
        batch = spec_batch(spec, spec_samples(spec, [L] * B, seed=0)).to(dev)
    else:
        batch = random_batch([L] * B, seed=0, items=100_000, categories=500).to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def train_step():
        model.zero_grad(set_to_none=True)
        with autocast:
            logits = model(batch)
        torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch.labels).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    train_s = median_seconds(train_step, steps=3, seconds=seconds)
    model.eval()
    if spec is not None:
        samples = spec_samples(spec, [L] + [0] * (SERVE_CANDIDATES - 1), seed=1)
        user = spec_batch(spec, samples[:1]).to(dev)
        cands = spec_candidates(spec, samples).to(dev)
    else:
        user = random_batch([L], seed=1, items=100_000, categories=500).to(dev)
        g = torch.Generator().manual_seed(2)
        cands = Candidates(
            item_id=torch.randint(0, 100_000, (1, SERVE_CANDIDATES), generator=g).to(dev),
            category_id=torch.randint(0, 500, (1, SERVE_CANDIDATES), generator=g).to(dev),
            ts=user.ts,
        )
    with torch.no_grad(), autocast:
        state = model.encode_user(user)

        def score():
            model.score(state, cands)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        serve_s = median_seconds(score, steps=5, seconds=seconds / 2)
    return {
        "train_samples_per_s": round(B / train_s, 1),
        "timing_batch": B,
        "serve_candidates_per_s": round(SERVE_CANDIDATES / serve_s),
    }


# --- tables -------------------------------------------------------------------------------------


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def power_law(x: list[float], y: list[float]) -> dict | None:
    """Least-squares fit of log y = log α + β·log x (AUC = α·xᵝ); None with fewer than 3 points."""
    import numpy as np

    if len(x) < 3:
        return None
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    beta, log_alpha = np.polyfit(lx, ly, 1)
    fit = log_alpha + beta * lx
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1 - float(((ly - fit) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {"alpha": float(math.exp(log_alpha)), "beta": float(beta), "r2": r2}


def rows_of(
    vs: list[Variant], runs: dict[str, dict], speed: dict[str, dict], seeds: list[int], key_of
) -> list[dict]:
    from longer.flops import forward_flops
    from longer.spec import FeatureSpec

    rows = []
    for v in vs:
        recs = [runs[key_of(v, s)] for s in seeds]
        row = {
            "table": v.table,
            "variant": v.label,
            "arch": v.model.arch,
            "max_len": v.model.max_len,
            "seeds": seeds,
            "gflops": forward_flops(v.model, FeatureSpec.from_config(v.features)) / 1e9,
            "features": v.features,
            **speed[v.key],
            "config": v.model.to_dict(),
        }
        for m in ("auc", "gauc", "logloss"):
            row[m], row[f"{m}_std"] = _mean_std([r[m] for r in recs])
        row["steps_run"] = [r.get("steps") for r in recs]
        row["best_step"] = [r.get("best_step") for r in recs]
        row["train_wall_s"] = statistics.fmean(r["wall_s"] for r in recs)
        rows.append(row)
    return rows


def run_cfg(v: Variant, train: dict, seed: int) -> dict:
    """The full RunConfig dict of one run: the variant's model, the shared [train] table, a seed
    (and the variant's [features], if any)."""
    run = {"model": v.model.to_dict(), "train": {**train, "seed": seed}}
    return {**run, "features": v.features} if v.features else run


def run_key(data_id: str, v: Variant, train: dict, seed: int) -> str:
    return config_key({"data": data_id, "run": run_cfg(v, train, seed)})


def _fmt(x: float, std: float | None, nd: int = 4) -> str:
    return f"{x:.{nd}f}" + (f" ± {std:.{nd}f}" if std is not None else "")


def _budget(train: dict) -> str:
    if not (train.get("val_days") or train.get("val_frac")):
        return f"one fixed budget: {train['steps']} steps"
    val = (
        f"the last {train['val_days']:g} days" if train["val_days"] else f"the latest {train['val_frac']:.0%}"
    )
    stop = (
        f"stopped after {train['early_stop']} evals without improvement, at most {train['steps']} steps"
        if train["early_stop"]
        else f"{train['steps']} steps"
    )
    return (
        f"trained to convergence: validation = {val} of the train split by time, evaluated every "
        f"{train['eval_every']} steps, {stop}; the eval figures are those of each run's best validation step"
    )


def _delta_cell(row: dict) -> str:
    d = row.get("delta_vs_base")
    return "(base)" if d is None else f"{d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def _steps(row: dict) -> str:
    return ", ".join(
        f"{b}/{n}" if b is not None else f"{n}"
        for b, n in zip(row.get("best_step", []), row.get("steps_run", []))
    )


def markdown(result: dict) -> str:
    rows, fits = result["rows"], result["scaling_fits"]
    d = result["dataset"]
    lines = [
        f"# LONGER quality bench: {d['name']}",
        "",
        f"`{result['command']}`",
        "",
        f"Dataset: {d['users']:,} users, {d['events']:,} events, {d['train']:,} train / {d['eval']:,} eval "
        f"samples (eval = ts ≥ {d['split_ts']}), longest history {d['max_hist_len']:,}. "
        f"Seeds {result['seeds']}; every variant trains with the same `[train]` settings "
        f"(batch {result['train']['batch_size']}, lr {result['train']['lr']}, emb_lr {result['train']['emb_lr']}; "
        f"{_budget(result['train'])}). Machine: {result['machine']['cpus']} CPUs, "
        f"{result['throughput_device']}; wall time {result['wall_s'] / 60:.1f} min.",
        "",
        "AUC, GAUC, LogLoss: eval split, mean ± std over seeds. Δ AUC vs base: the paired difference "
        "against the base LONGER config on the same eval samples, with the verdicts' bootstrap CI (users "
        "and seeds resampled; see the rule under *Against the paper*). GFLOPs: analytic forward per sample at "
        "full length. train/s: forward + backward samples/s on full-length batches. serve/s: candidates/s "
        f"on the hit path ({SERVE_CANDIDATES} candidates against a cached user state).",
        "",
    ]
    for table in PAPER_TABLES:
        tr = [r for r in rows if r["table"] == table]
        if not tr:
            continue
        lines += [
            f"## {TABLE_TITLES[table]}",
            "",
            "| variant | AUC | Δ AUC vs base LONGER [95 % CI] | GAUC | LogLoss | best step / steps per seed "
            "| GFLOPs | train/s | serve/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in tr:
            lines.append(
                f"| {r['variant']} | {_fmt(r['auc'], r['auc_std'])} | {_delta_cell(r)} | "
                f"{_fmt(r['gauc'], r['gauc_std'])} | "
                f"{_fmt(r['logloss'], r['logloss_std'])} | {_steps(r)} | {r['gflops']:.4g} | "
                f"{r['train_samples_per_s']:,.0f} | {r['serve_candidates_per_s']:,} |"
            )
        if table == "features":
            base_auc, longer_auc = PAPER["base"]["auc"], PAPER["longer"]["auc"]
            lines += [
                "",
                f"The paper's Table 1 (Douyin ads, its production features): Base {base_auc:.5f} → "
                f"LONGER {longer_auc:.5f} (+{longer_auc - base_auc:.5f} AUC).",
            ]
        if table == "scaling":
            by_arch = result.get("scaling_fits_by_arch") or {"longer": fits}
            for arch, arch_fits in by_arch.items():
                for axis, f in arch_fits.items():
                    if f:
                        lines += [
                            "",
                            f"Power-law fit of {arch} against {axis}: AUC = {f['alpha']:.4f} · "
                            f"x^{f['beta']:.5f} (R² = {f['r2']:.3f}).",
                        ]
        lines.append("")
    if result["comparison"]:
        lines += [
            "## Against the paper",
            "",
            "| claim | paper (Douyin) | ours (paired Δ AUC, 95 % CI) | verdict |",
            "|---|---|---|---|",
        ]
        for c in result["comparison"]:
            lines.append(f"| {c['claim']} | {c['paper']} | {c['ours']} | {c['verdict']} |")
        lines += ["", result["verdict_rule"], ""]
    lines += ["Plots: " + ", ".join(f"`{p}`" for p in result["plots"]), ""]
    return "\n".join(lines)


def _log_axes(ax, xlabel: str, title: str) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=xlabel, ylabel="eval AUC", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, name = result["rows"], result["dataset"]["name"]
    made = []
    # 1. cost vs quality: the baselines and the merge and query variants, each config once
    fig, ax = plt.subplots(figsize=(8, 5.5))
    seen = set()
    for table, mk in {"baselines": "o", "merge": "s", "queries": "^"}.items():
        tr = []
        for r in rows:
            key = row_key(r)
            if r["table"] == table and key not in seen:
                seen.add(key)
                tr.append(r)
        if tr:
            ax.errorbar(
                [r["gflops"] for r in tr],
                [r["auc"] for r in tr],
                yerr=[r["auc_std"] or 0 for r in tr],
                fmt=mk,
                capsize=3,
                label=table,
            )
            for r in tr:
                label = f"{r['variant']} (base)" if r["variant"] == "longer" else r["variant"]
                ax.annotate(
                    label, (r["gflops"], r["auc"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    _log_axes(ax, "forward GFLOPs per sample (log)", f"{name}: AUC against cost")
    made.append(_save(fig, out / "tradeoff.png"))
    # 2. scaling with fits, a series per arch
    sc = sorted((r for r in rows if r["table"] == "scaling"), key=lambda r: r["max_len"])
    if sc:
        import numpy as np

        by_arch = result.get("scaling_fits_by_arch") or {"longer": result["scaling_fits"]}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, axis in zip(axes, ("max_len", "gflops")):
            for arch in dict.fromkeys(r["arch"] for r in sc):
                ar = [r for r in sc if r["arch"] == arch]
                xs, ys = [r[axis] for r in ar], [r["auc"] for r in ar]
                line = ax.errorbar(
                    xs, ys, yerr=[r["auc_std"] or 0 for r in ar], fmt="o", capsize=3, label=arch
                )
                f = by_arch.get(arch, {}).get(axis)
                if f:
                    grid = np.geomspace(min(xs), max(xs), 50)
                    ax.plot(
                        grid,
                        f["alpha"] * grid ** f["beta"],
                        "--",
                        color=line[0].get_color(),
                        label=f"{arch}: AUC = {f['alpha']:.3f}·x^{f['beta']:.4f} (R² {f['r2']:.2f})",
                    )
            _log_axes(
                ax,
                "max_len (log)" if axis == "max_len" else "forward GFLOPs per sample (log)",
                f"{name}: AUC against {axis}",
            )
        made.append(_save(fig, out / "scaling.png"))
    # 3. ablations: AUC (± std over seeds) per table
    abl = [t for t in ("merge", "queries", "norms", "phd") if any(r["table"] == t for r in rows)]
    if abl:
        fig, axes = plt.subplots(1, len(abl), figsize=(4.2 * len(abl), 4.5), squeeze=False)
        for ax, t in zip(axes[0], abl):
            tr = [r for r in rows if r["table"] == t]
            y = list(range(len(tr)))
            ax.errorbar([r["auc"] for r in tr], y, xerr=[r["auc_std"] or 0 for r in tr], fmt="o", capsize=3)
            ax.set_yticks(y, [r["variant"] for r in tr])
            ax.set_ylim(-0.5, len(tr) - 0.5)
            lo = min(r["auc"] - (r["auc_std"] or 0) for r in tr)
            hi = max(r["auc"] + (r["auc_std"] or 0) for r in tr)
            pad = max(0.002, (hi - lo) * 0.1)
            ax.set_xlim(lo - pad, hi + pad)
            ax.set(title=TABLE_TITLES[t].split(":")[-1].strip(), xlabel="eval AUC")
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(alpha=0.3, axis="x")
        made.append(_save(fig, out / "ablations.png"))
    return made


# --- entry point ----------------------------------------------------------------------------------

QUICK_STEPS = 60  # --quick: at most this many training steps per run
QUICK_BOOT = 200  # --quick: bootstrap draws per verdict


def main(
    data: str,
    config: str,
    out: str,
    quick: bool = False,
    seeds: int | None = None,
    jobs: int | None = None,
    lengths: list[int] | None = None,
    tables: list[str] | None = None,
    device: str | None = None,
    progress: bool = True,
    scaling_archs: list[str] | None = None,
    command: str = "",
    overrides: list[str] = (),
) -> dict:
    import torch

    from feature_store.builder import read_meta
    from longer.config import ConfigError
    from longer.spec import FeatureSpec
    from trainer.config import RunConfig

    t0 = time.time()
    data, out = Path(data), Path(out)
    meta = read_meta(data)
    cfg = RunConfig.load(config, list(overrides))
    base = cfg.model
    if base.arch != "longer":
        raise ConfigError(
            f'{config}: bench quality needs a LONGER base config (arch = "longer"), got {base.arch!r}'
        )
    if base.max_len > meta["max_len"]:
        raise ConfigError(
            f"{config}: max_len {base.max_len} exceeds the dataset's --max-len {meta['max_len']}"
        )
    features = cfg.to_dict().get("features")  # None: the default spec
    # by default every table the config allows (features: only with a [features] table)
    tables = list(tables or [t for t in PAPER_TABLES if t != "features" or features])
    unknown = sorted(set(tables) - set(PAPER_TABLES))
    if unknown:
        raise ConfigError(f"--tables: unknown table {unknown[0]!r} (known: {', '.join(PAPER_TABLES)})")
    train = cfg.train
    if quick:
        train = replace(
            train, steps=min(train.steps, QUICK_STEPS), warmup_steps=min(train.warmup_steps, QUICK_STEPS // 4)
        )
    if quick and train.has_val:
        train = replace(train, eval_every=min(train.eval_every, QUICK_STEPS // 6))
    # with a validation split every run stops early by the same rule; without, one fixed budget
    train = replace(train, eval_every=train.eval_every if train.has_val else 0, checkpoint_every=0)
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {n_seeds}")
    seed_list = [train.seed + i for i in range(n_seeds)]
    jobs = jobs if jobs is not None else (1 if torch.cuda.is_available() else min(cpu_budget(), 8))
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lengths = sorted(set(lengths or default_lengths(base.max_len, meta["max_len"], quick)))
    too_long = [n for n in lengths if n > meta["max_len"]]
    if too_long:
        raise ConfigError(f"--lengths: {too_long[0]} exceeds the dataset's --max-len {meta['max_len']}")

    out.mkdir(parents=True, exist_ok=True)
    data_id = hashlib.sha1((data / "meta.json").read_bytes()).hexdigest()[:16]
    train_table = dataclasses.asdict(train)
    shared = {k: v for k, v in train_table.items() if k != "seed"}  # every run's [train], less its seed

    def key_of(v: Variant, seed: int) -> str:
        return run_key(data_id, v, shared, seed)

    if "features" in tables and not features:
        raise ConfigError(f"{config}: --tables features needs a [features] table in the config")
    scaling_archs = list(scaling_archs or ["longer"])
    bad = sorted(set(scaling_archs) - set(SCALING_ARCHS))
    if bad:
        raise ConfigError(f"--scaling-archs: unknown arch {bad[0]!r} (known: {', '.join(SCALING_ARCHS)})")
    vs = variants(base, lengths, quick, tables, features, scaling_archs)
    plan, seen = [], set()
    for v in vs:
        for s in seed_list:
            k = key_of(v, s)
            if k not in seen:
                seen.add(k)
                plan.append((k, run_cfg(v, shared, s), s))
    runs = train_all(plan, data, out, jobs, progress)

    from tqdm import tqdm

    configure_threads(env_threads(), "LONGER_THREADS")
    speed: dict[str, dict] = {}
    distinct = {v.key: v for v in vs}
    for k, v in tqdm(distinct.items(), desc="throughput", unit="variant", disable=not progress):
        spec = (
            replace(cfg, features=FeatureSpec.from_config(v.features)).resolved_spec(meta)
            if v.features
            else None
        )
        speed[k] = throughput(v.model, device, seconds=2.0 if quick else 6.0, spec=spec)

    rows = rows_of(vs, runs, speed, seed_list, key_of)
    arms = {v.key: load_arm(out, [key_of(v, s) for s in seed_list]) for v in {v.key: v for v in vs}.values()}
    n_boot = QUICK_BOOT if quick else N_BOOT
    deltas_vs(rows, variant_key(base.to_dict()), arms, row_key, n_boot)
    fits_by_arch = scaling_fits(rows)
    fits = fits_by_arch.get("longer", {"max_len": None, "gflops": None})
    hl = meta.get("hist_len", {})
    result = {
        "benchmark": "quality",
        "quick": quick,
        "command": command
        or f"longer bench quality --data {data} --config {config} --out {out}"
        + (" --quick" if quick else "")
        + "".join(f" {o}" for o in overrides),
        "dataset": {
            "name": data.name,
            "path": str(data),
            "users": meta["rows"]["users"],
            "events": meta["rows"]["events"],
            "train": meta["rows"]["train"],
            "eval": meta["rows"]["eval"],
            "split_ts": meta["split"]["split_ts"],
            "max_hist_len": hl.get("max", meta["max_len"]),
        },
        "base_model": base.to_dict(),
        "train": train_table,
        "seeds": seed_list,
        "jobs": jobs,
        "throughput_device": device if device != "cuda" else torch.cuda.get_device_name(),
        "machine": machine(),
        "rows": rows,
        "scaling_fits": fits,
        "scaling_fits_by_arch": fits_by_arch,
        "comparison": comparison(rows, base, arms, n_boot=n_boot),
        "verdict_rule": RULE,
        "paper": PAPER,
        "runs": [runs[k] for k, _, _ in plan],
    }
    result["wall_s"] = round(time.time() - t0, 1)
    result["plots"] = plots(result, out)
    curves = plot_curves(result, out)
    if curves:
        result["plots"].append(curves)
    _write(out / "results.json", json.dumps(result, indent=2) + "\n")
    _write(out / "results.md", markdown(result))
    print(
        f"bench quality: wrote {out}/results.json, results.md, {', '.join(result['plots'])}", file=sys.stderr
    )
    return {
        "out": str(out),
        "rows": len(rows),
        "runs": len(plan),
        "wall_s": result["wall_s"],
        "comparison": result["comparison"],
    }


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)

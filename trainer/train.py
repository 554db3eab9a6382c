"""The training loop: `longer train` (one process) and `torchrun -m trainer` (several).

Each step runs TorchRec's TrainPipelineSparseDist: the next batch's embedding ids travel to
their shards while the current batch computes; the fused embedding optimizer updates rows in
backward and AdamW the dense weights in the same step.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from feature_store.builder import read_meta
from feature_store.loader import BatchLoader
from longer.flops import forward_flops
from longer.recmodel import build_model

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig
from .distributed import broadcast, init_distributed
from .evaluate import metrics_of, predict_split, write_predictions
from .export import write_bundle
from .sharding import plan_table, shard

# Settings a resumed run may change; everything else must match the checkpoint.
RESUMABLE_CHANGES = {"steps", "eval_every", "checkpoint_every", "log_every", "prefetch", "eval_batch_size"}


class _TrainBatches:
    """Endless batches over epochs, remembering the loader state after each batch."""

    def __init__(self, loader: BatchLoader, count: int = 0):
        self.loader, self.count = loader, count
        self.states = {count: loader.state_dict()}

    def __iter__(self):
        while True:
            if len(self.loader) == 0:
                raise ValueError(
                    f"{self.loader.data_dir}: train split smaller than one global batch "
                    f"({self.loader.world_size} ranks × {self.loader.batch_size})"
                )
            for batch in self.loader:
                self.count += 1
                self.states[self.count] = self.loader.state_dict()
                yield batch

    def state_after(self, n_batches: int) -> dict:
        state = self.states[n_batches]
        for k in [k for k in self.states if k < n_batches]:
            del self.states[k]
        return state


def _check_resume(saved: dict, cfg: RunConfig) -> None:
    now = cfg.to_dict()
    if saved["model"] != now["model"]:
        diff = sorted(k for k in now["model"] if saved["model"].get(k) != now["model"][k])
        raise ConfigError(f"--resume: model config differs from the checkpoint's ({', '.join(diff)})")
    diff = sorted(
        k for k in now["train"] if saved["train"].get(k) != now["train"][k] and k not in RESUMABLE_CHANGES
    )
    if diff:
        raise ConfigError(
            f"--resume: train config differs from the checkpoint's in {', '.join(diff)} "
            f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
        )


def _seed(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def _restartable(run: Path, cfg: RunConfig) -> bool:
    """A run directory that this very run started and left before its first checkpoint: it holds
    no complete checkpoint and a config.json equal to `cfg` (what an elastic restart finds)."""
    try:
        return (
            ckpt.latest_checkpoint(run) is None
            and json.loads((run / "config.json").read_text()) == cfg.to_dict()
        )
    except (OSError, ValueError):
        return False


def _replace_run(new: Path, old: Path) -> None:
    """Put the finished run `new` where `old` is; `old` is deleted only after the swap."""
    aside = old.parent / f".{old.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside, ignore_errors=True)


def _drop_metrics_after(run: Path, step: int) -> None:
    """Keep metrics.jsonl lines of steps up to the resumed checkpoint's (and no torn line), so
    the resumed run logs every later step exactly once."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def _start_point(
    run: Path, cfg: RunConfig, resume: bool, auto_resume: bool
) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from or None, error) — rank 0 only: checks the run directory,
    verifies the checkpoint's files against its manifest, trims metrics.jsonl and removes
    the partial checkpoints of a killed attempt."""

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        latest = ckpt.choose_checkpoint(run, fallback=auto_resume, log=log) if resume or auto_resume else None
    except ckpt.CheckpointError as e:
        return None, str(e)
    if latest is None and (resume or auto_resume) and ckpt.complete_checkpoints(run):
        return None, (
            f"{run}: no checkpoint in {run}/checkpoints passes its manifest check (see above); move them "
            f"aside to start the run over"
        )
    if resume and latest is None:
        return None, f"{run}: --resume, but no complete checkpoint in {run}/checkpoints"
    if (
        latest is None
        and run.exists()
        and any(run.iterdir())
        and not (auto_resume and _restartable(run, cfg))
    ):
        return None, (
            f"{run}: run directory exists and is not empty (pass --resume to continue it, or --overwrite "
            "to replace it)"
        )
    if latest is not None:
        try:
            _check_resume(json.loads((latest / ckpt.STATE_FILE).read_text())["config"], cfg)
        except ConfigError as e:
            return None, str(e)
    run.mkdir(parents=True, exist_ok=True)  # the run is this job's from here on
    ckpt.remove_partial_checkpoints(run, log)
    if latest is None:  # from step 0: metrics of an attempt that died are not this run's
        (run / "metrics.jsonl").unlink(missing_ok=True)
    else:
        _drop_metrics_after(run, ckpt.step_of(latest))
    return latest, None


def train(
    cfg: RunConfig,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    auto_resume: bool = False,
    overwrite: bool = False,
) -> dict | None:
    """Train, evaluate, checkpoint and export; returns a summary on rank 0 (None elsewhere).

    `auto_resume` (for schedulers that restart a job with its original arguments, e.g. torchrun
    elastic): resume from the newest checkpoint that passes its manifest check (an older one
    when a newer one fails), else start from step 0 — also in a run directory that the same
    config left before its first checkpoint.

    `overwrite` with an existing run directory: train from step 0 in a hidden sibling directory
    and swap it in for the old run only once it has finished (exported); an interrupted or
    failed run leaves the old one untouched."""
    ctx = init_distributed()
    data, run = Path(data), Path(out)
    if overwrite and (resume or auto_resume):
        raise ConfigError(
            "--overwrite starts a new run; it cannot be combined with --resume or --auto-resume"
        )
    target = run  # where the run ends up; `run` is where it is written
    if overwrite and run.is_dir() and any(run.iterdir()):
        run = run.parent / f".{run.name}.partial-overwrite"  # the same name on every rank
    tc = cfg.train
    meta = read_meta(data)
    if cfg.model.max_len > meta["max_len"]:
        raise ConfigError(
            f"model.max_len={cfg.model.max_len} exceeds the dataset's --max-len {meta['max_len']}"
        )
    if ctx.device.type == "cpu":  # TorchRec warns about CUDA streams that a CPU run does not have
        logging.getLogger("torchrec.distributed.train_pipeline.postproc").setLevel(logging.ERROR)
    # Deprecation notices inside TorchRec 1.8 itself (DDP's broadcast_buffers, ShardedTensor): not ours to act on.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*", category=FutureWarning)

    if ctx.is_main and run != target:  # --overwrite: a previous attempt's leftovers are not this run's
        shutil.rmtree(run, ignore_errors=True)
        print(
            f"train: --overwrite: training in {run}; it replaces {target} once it has finished",
            file=sys.stderr,
            flush=True,
        )
    latest, err = _start_point(run, cfg, resume, auto_resume) if ctx.is_main else (None, None)
    latest, err = broadcast((str(latest) if latest else None, err))
    if err:
        raise ConfigError(err)
    latest = Path(latest) if latest else None

    _seed(tc.seed, tc.deterministic)
    model = build_model(cfg.model)
    dmp, optimizer, dense_opt, plan = shard(model, tc, ctx)
    loader = BatchLoader(
        data,
        "train",
        batch_size=tc.batch_size,
        max_len=cfg.model.max_len,
        seed=tc.seed,
        shuffle_window=tc.shuffle_window,
        rank=ctx.rank,
        world_size=ctx.world_size,
        drop_last=True,
        prefetch=tc.prefetch,
    )
    eval_loader = BatchLoader(
        data,
        "eval",
        batch_size=tc.eval_batch_size,
        max_len=cfg.model.max_len,
        rank=ctx.rank,
        world_size=ctx.world_size,
        sequences=loader.sequences,
    )
    step = 0
    if latest is not None:
        state = ckpt.load_checkpoint(latest, dmp, optimizer)
        step = state["step"]
        loader.load_state_dict(state["loader"])

    writer = None
    if ctx.is_main:
        (run / "config.json").write_text(cfg.dumps() + "\n")
        (run / "plan.txt").write_text(plan_table(plan) + "\n")
        print(
            f"sharding plan ({ctx.world_size} rank{'s' * (ctx.world_size > 1)}):\n{plan_table(plan)}",
            file=sys.stderr,
            flush=True,
        )  # stdout carries only the summary JSON
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops what a killed attempt logged after the resumed checkpoint
        writer = SummaryWriter(log_dir=str(run / "tb"), purge_step=step + 1 if latest is not None else None)

    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    def start_pipeline(at_step: int):
        """A fresh pipeline whose first batch is the one after `at_step` trained batches."""
        feed = _TrainBatches(loader, count=at_step)
        return TrainPipelineSparseDist(dmp, optimizer, ctx.device, pipeline_postproc=True), feed, iter(feed)

    pipe, batches, it = start_pipeline(step)
    global_batch = tc.batch_size * ctx.world_size
    last_eval: dict = {}

    def run_eval(at_step: int, final: bool) -> dict:
        # The pipeline has batches in flight (their ids already sent to the shards): set it
        # aside, evaluate through the plain sharded model, and restart it afterwards from the
        # loader state after the last trained batch, so no batch is skipped or repeated.
        nonlocal pipe, batches, it
        resume_at = batches.state_after(at_step)
        pipe.detach()
        it.close()
        dmp.eval()
        pred = predict_split(
            lambda b: dmp(b)[1][1], eval_loader, ctx.device, progress=progress and ctx.is_main
        )
        dmp.train()
        if not final:
            loader.load_state_dict(resume_at)
            pipe, batches, it = start_pipeline(at_step)
        result = {}
        if ctx.is_main:
            result = {"step": at_step, "split": "eval", **metrics_of(pred), "time": time.time()}
            if final:
                write_predictions(pred, run / "predictions.parquet")
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            for k in ("auc", "gauc", "logloss", "calibration"):
                writer.add_scalar(f"eval/{k}", result[k], at_step)
        return result

    bar = tqdm(
        total=tc.steps, initial=step, desc="train", unit="step", disable=not (progress and ctx.is_main)
    )
    s0, loss_sum, loss_n, train_seconds = step, 0.0, 0, 0.0  # train_seconds: steps only, not evals
    dmp.train()
    while step < tc.steps:
        dense_opt.set_lr(tc.lr_at(step))
        t = time.perf_counter()
        loss, _, _ = pipe.progress(it)
        loss_sum, loss_n = loss_sum + float(loss), loss_n + 1
        train_seconds += time.perf_counter() - t
        step += 1
        if step % tc.log_every == 0 or step == tc.steps:
            rate = global_batch * (step - s0) / train_seconds
            bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", samples_s=f"{rate:,.0f}")
            if writer:
                writer.add_scalar("train/loss", loss_sum / loss_n, step)
                writer.add_scalar("train/lr", tc.lr_at(step - 1), step)
                writer.add_scalar("train/samples_per_s", rate, step)
            loss_sum, loss_n = 0.0, 0
        bar.update(1)
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
            ckpt.save_checkpoint(run, step, dmp, optimizer, batches.state_after(step), cfg.to_dict())
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
            last_eval = run_eval(step, final=False)
    bar.close()
    samples_per_s = global_batch * (step - s0) / max(train_seconds, 1e-9)
    ckpt.save_checkpoint(run, step, dmp, optimizer, batches.state_after(step), cfg.to_dict())
    last_eval = run_eval(step, final=True)

    from .export import gather_unsharded

    tensors = gather_unsharded(dmp)
    version = write_bundle(run / "export", tensors, cfg, meta) if ctx.is_main else None
    if writer:
        writer.close()
    if ctx.is_main and run != target:
        _replace_run(run, target)
    summary = {
        "run": str(target),
        "steps": step,
        "world_size": ctx.world_size,
        "train_samples_per_s": round(samples_per_s, 1),
        "gflops_fwd_per_sample": round(forward_flops(cfg.model) / 1e9, 4),
        "model_version": version,
        "eval": last_eval,
    }
    return summary if ctx.is_main else None

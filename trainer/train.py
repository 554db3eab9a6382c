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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from feature_store.builder import read_meta
from feature_store.loader import BatchLoader
from longer.config import renamed_model_key
from longer.errors import InputError
from longer.flops import forward_flops
from longer.recmodel import build_model

from . import checkpoint as ckpt
from .allocator import keep_freed_memory
from .config import ConfigError, RunConfig
from .distributed import broadcast, init_distributed
from .early_stop import METRIC, EarlyStop, val_start
from .evaluate import metrics_of, predict_split, write_predictions
from .export import write_bundle
from .sharding import plan_table, shard
from .threads import configure_threads

# Settings a resumed run may change; everything else must match the checkpoint.
RESUMABLE_CHANGES = {
    "steps",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "prefetch",
    "eval_batch_size",
    "threads",
}


class _TrainBatches:
    """Endless batches over epochs, remembering the loader state after each batch."""

    def __init__(self, loader: BatchLoader, count: int = 0, samples: int = 0):
        self.loader, self.count = loader, count
        self.states = {count: loader.state_dict()}
        self.samples = {count: samples}  # this rank's samples in batches [0, count) of this run
        # (a batch's sample count varies with request-level batching: its unit is a request)

    def __iter__(self):
        while True:
            if len(self.loader) == 0:
                raise InputError(
                    f"{self.loader.data_dir}: train split smaller than one global batch "
                    f"({self.loader.world_size} ranks × {self.loader.batch_size})"
                )
            for batch in self.loader:
                self.count += 1
                self.states[self.count] = self.loader.state_dict()
                self.samples[self.count] = self.samples[self.count - 1] + batch.batch_size
                yield batch

    def state_after(self, n_batches: int) -> dict:
        state = self.states[n_batches]
        for k in [k for k in self.states if k < n_batches]:
            del self.states[k], self.samples[k]
        return state


def _check_resume(saved: dict, cfg: RunConfig) -> None:
    now = cfg.to_dict()
    saved = {**saved, "model": renamed_model_key(saved["model"], "--resume: the checkpoint's [model]")}
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


class Trainer:
    """One training run: `setup` (dataset and run directory checks, model, sharding, loaders),
    `resume` (from a checkpoint, or step 0), `step` (one optimizer step; `train_steps` loops it
    with logging and the periodic checkpoints and evals), `evaluate` and `export`; `fit` runs
    them in that order and returns the summary on rank 0.

    State lives on the instance: the steps done (`self.at`), the TorchRec pipeline, the batch feed
    it reads from (`self.batches`, which remembers the loader state after every batch) and its
    iterator. An eval sets the pipeline aside and restarts it after the last trained batch, so
    a run with evals sees exactly the batches of a run without them.

    `auto_resume` (for schedulers that restart a job with its original arguments, e.g. torchrun
    elastic): resume from the newest checkpoint that passes its manifest check (an older one
    when a newer one fails), else start from step 0 — also in a run directory that the same
    config left before its first checkpoint.

    `overwrite` with an existing run directory: train from step 0 in a hidden sibling directory
    and swap it in for the old run only once it has finished (exported); an interrupted or
    failed run leaves the old one untouched."""

    def __init__(
        self,
        cfg: RunConfig,
        data: str | Path,
        out: str | Path,
        resume: bool = False,
        progress: bool = True,
        auto_resume: bool = False,
        overwrite: bool = False,
        on_step: Callable[[Trainer], None] | None = None,
    ):
        if overwrite and (resume or auto_resume):
            raise ConfigError(
                "--overwrite starts a new run; it cannot be combined with --resume or --auto-resume"
            )
        self.cfg, self.tc = cfg, cfg.train
        self.data, self.target = Path(data), Path(out)  # `target`: where the run ends up
        self.run = self.target  # where it is written
        self.want_resume, self.auto_resume, self.overwrite = resume, auto_resume, overwrite
        self.ctx = init_distributed()
        self.show_progress = progress and self.ctx.is_main
        self.at = 0  # optimizer steps done
        self.batches: _TrainBatches | None = None  # the pipeline's batch feed (restarted after evals)
        self.last_eval: dict = {}
        self.writer = None
        self.train_seconds = 0.0  # optimizer steps only, not evals or checkpoints
        self.t_start = time.time()
        self.curve = [0.0, 0]  # train loss sum and steps since the last eval: each eval line's train_loss
        self.saved_at: int | None = None  # the step of the latest checkpoint this process wrote
        self.on_step = on_step  # called after every step's evals and checkpoints (bench/fragility.py)

    # --- setup ------------------------------------------------------------------------------------
    def setup(self) -> Path | None:
        """Check the dataset and the run directory, build and shard the model, open the loaders;
        returns the checkpoint to resume from, or None."""
        ctx, tc = self.ctx, self.tc
        if self.overwrite and self.run.is_dir() and any(self.run.iterdir()):
            self.run = self.run.parent / f".{self.run.name}.partial-overwrite"  # the same on every rank
        self.meta = read_meta(self.data)
        if self.cfg.model.max_len > self.meta["max_len"]:
            raise ConfigError(
                f"model.max_len={self.cfg.model.max_len} exceeds the dataset's --max-len {self.meta['max_len']}"
            )
        _quiet_torchrec(ctx.device.type)
        configure_threads(tc.threads or None, "train.threads", log=ctx.is_main)
        keep_freed_memory()  # no page faults on every step's buffers (trainer/allocator.py)
        latest = self._choose_start()
        self.val_ts = val_start(self.data, self.meta, tc)  # None: no validation split
        self.stopper = EarlyStop(tc.early_stop)
        _seed(tc.seed, tc.deterministic)
        self.spec = self.cfg.resolved_spec(self.meta)  # SpecError names a column the data lacks
        model = build_model(self.cfg.model, self.spec)
        self.dmp, self.optimizer, self.dense_opt, self.plan = shard(model, tc, ctx)
        self.loader, self.eval_loader, self.val_loader = self._loaders()
        return latest

    def _choose_start(self) -> Path | None:
        """The checkpoint to resume from (rank 0 decides, every rank learns it)."""
        if self.ctx.is_main and self.run != self.target:  # --overwrite: an earlier attempt's leftovers
            shutil.rmtree(self.run, ignore_errors=True)
            print(
                f"train: --overwrite: training in {self.run}; it replaces {self.target} once it has finished",
                file=sys.stderr,
                flush=True,
            )
        latest, err = (
            _start_point(self.run, self.cfg, self.want_resume, self.auto_resume)
            if self.ctx.is_main
            else (None, None)
        )
        latest, err = broadcast((str(latest) if latest else None, err))
        if err:
            raise ConfigError(err)
        return Path(latest) if latest else None

    def _loaders(self) -> tuple[BatchLoader, BatchLoader, BatchLoader | None]:
        """Train, eval and (with a validation split) validation loaders; the validation split is
        the train split's samples from val_ts on, and training takes only those before it."""
        tc, ctx, max_len, val_ts = self.tc, self.ctx, self.cfg.model.max_len, self.val_ts
        common = {
            "max_len": max_len,
            "rank": ctx.rank,
            "world_size": ctx.world_size,
            "spec": self.spec,
            "requests": tc.rlb,
        }
        train = BatchLoader(
            self.data,
            "train",
            batch_size=tc.batch_size,
            seed=tc.seed,
            shuffle_window=tc.shuffle_window,
            drop_last=True,
            prefetch=tc.prefetch,
            ts_range=None if val_ts is None else (None, val_ts),
            **common,
        )
        evals = BatchLoader(
            self.data,
            "eval",
            batch_size=tc.eval_batch_size,
            sequences=train.sequences,
            **common,
        )
        val = None
        if val_ts is not None:
            val = BatchLoader(
                self.data,
                "train",
                batch_size=tc.eval_batch_size,
                shuffle=False,
                sequences=train.sequences,
                ts_range=(val_ts, None),
                **common,
            )
        return train, evals, val

    # --- resume -----------------------------------------------------------------------------------
    def resume(self, latest: Path | None) -> None:
        """Restore model, optimizers and loader position from `latest` (None: from step 0), then
        write the run's config and plan and open TensorBoard."""
        if latest is not None:
            state = ckpt.load_checkpoint(latest, self.dmp, self.optimizer)
            self.at = state["step"]
            self.loader.load_state_dict(state["loader"])
            self.stopper.load_state_dict(state.get("early_stop"))
        if self.ctx.is_main:
            self._open_run(purge_step=self.at + 1 if latest is not None else None)
        self._start_pipeline()
        self.dmp.train()

    def _open_run(self, purge_step: int | None) -> None:
        table = plan_table(self.plan)
        (self.run / "config.json").write_text(self.cfg.dumps() + "\n")
        (self.run / "plan.txt").write_text(table + "\n")
        n = self.ctx.world_size
        # stdout carries only the summary JSON
        print(f"sharding plan ({n} rank{'s' * (n > 1)}):\n{table}", file=sys.stderr, flush=True)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops what a killed attempt logged after the resumed checkpoint
        self.writer = SummaryWriter(log_dir=str(self.run / "tb"), purge_step=purge_step)

    def _start_pipeline(self) -> None:
        """A fresh pipeline whose first batch is the one after `self.at` trained batches."""
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        seen = self.batches.samples.get(self.at, 0) if self.batches is not None else 0
        self.batches = _TrainBatches(self.loader, count=self.at, samples=seen)
        self.pipe = TrainPipelineSparseDist(self.dmp, self.optimizer, self.ctx.device, pipeline_postproc=True)
        self.it = iter(self.batches)

    # --- the loop ---------------------------------------------------------------------------------
    def step(self) -> float:
        """One optimizer step on the next batch; its loss. Adds the step's time (the step
        alone) to `self.train_seconds`."""
        t = time.perf_counter()
        self.dense_opt.set_lr(self.tc.lr_at(self.at))
        loss, _, _ = self.pipe.progress(self.it)
        loss = float(loss)
        self.train_seconds += time.perf_counter() - t
        self.at += 1
        self.curve[0], self.curve[1] = self.curve[0] + loss, self.curve[1] + 1
        return loss

    def checkpoint(self) -> None:
        """Save a checkpoint at this step (with the early-stop state); with a validation split,
        drop the checkpoints of superseded best steps that no checkpoint_every asked for."""
        state = self.batches.state_after(self.at)
        extra = {"early_stop": self.stopper.state_dict()}
        ckpt.save_checkpoint(self.run, self.at, self.dmp, self.optimizer, state, self.cfg.to_dict(), extra)
        self.saved_at = self.at
        every = self.tc.checkpoint_every
        if self.val_loader is not None and self.ctx.is_main:
            for old in ckpt.complete_checkpoints(self.run):
                s = ckpt.step_of(old)
                if s not in (self.at, self.stopper.best_step) and not (every and s % every == 0):
                    shutil.rmtree(old, ignore_errors=True)

    def train_steps(self) -> float:
        """Steps until `train.steps`, with a progress bar, the loss, learning rate and samples/s
        logged every `log_every` steps, and the checkpoints and evals the config asks for
        between them (`fit` does the last ones); samples per second of the steps alone."""
        tc, s0 = self.tc, self.at
        seen0, world = self.batches.samples[s0], self.ctx.world_size
        bar = tqdm(total=tc.steps, initial=s0, desc="train", unit="step", disable=not self.show_progress)
        loss_sum, loss_n, self.train_seconds = 0.0, 0, 0.0
        while self.at < tc.steps and not self.stopper.should_stop:
            loss_sum, loss_n = loss_sum + self.step(), loss_n + 1
            if self.at % tc.log_every == 0 or self.at == tc.steps:
                rate = world * (self.batches.samples[self.at] - seen0) / self.train_seconds
                bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", samples_s=f"{rate:,.0f}")
                self._log_train(loss_sum / loss_n, rate)
                loss_sum, loss_n = 0.0, 0
            bar.update(1)
            improved = False
            if (
                self.val_loader is not None
                and tc.eval_every
                and (self.at % tc.eval_every == 0 or self.at == tc.steps)
            ):
                improved = self.validate()
            elif self.at < tc.steps and tc.eval_every and self.at % tc.eval_every == 0:
                self.last_eval = self.evaluate(final=False)
            # after the eval, so that a checkpoint carries the early-stop state of its step
            if self.at < tc.steps and (
                (tc.checkpoint_every and self.at % tc.checkpoint_every == 0) or improved
            ):
                self.checkpoint()
            if self.on_step is not None:
                self.on_step(self)
        bar.close()
        return world * (self.batches.samples[self.at] - seen0) / max(self.train_seconds, 1e-9)

    def _log_train(self, loss: float, rate: float) -> None:
        if self.writer:
            self.writer.add_scalar("train/loss", loss, self.at)
            self.writer.add_scalar("train/lr", self.tc.lr_at(self.at - 1), self.at)
            self.writer.add_scalar("train/samples_per_s", rate, self.at)

    # --- evaluate ---------------------------------------------------------------------------------
    def validate(self) -> bool:
        """Evaluate the validation split and update the early stop (every rank takes rank 0's
        figure, so all stop and save together); True when this step is the new best."""
        return self.stopper.update(self.at, broadcast(self.evaluate(final=False, split="val").get(METRIC)))

    def predict(self, split: str = "eval", restart: bool = True) -> dict | None:
        """Per-sample predictions of the current weights on the eval (or validation) split
        (rank 0; None elsewhere; `evaluation.predict_split`'s columns).

        The pipeline has batches in flight (their ids already sent to the shards): set it
        aside, predict through the plain sharded model, and (`restart`) restart it afterwards
        from the loader state after the last trained batch, so no batch is skipped or repeated."""
        resume_at = self.batches.state_after(self.at)
        self.pipe.detach()
        self.it.close()
        self.dmp.eval()
        loader = self.val_loader if split == "val" else self.eval_loader
        pred = predict_split(
            lambda b: self.dmp(b)[1][1], loader, self.ctx.device, progress=self.show_progress
        )
        self.dmp.train()
        if restart:
            self.loader.load_state_dict(resume_at)
            self._start_pipeline()
        return pred

    def evaluate(self, final: bool, split: str = "eval") -> dict:
        """Metrics on the eval (or validation) split (rank 0; {} elsewhere), appended to metrics.jsonl
        (`predict`; the final eval leaves the pipeline stopped)."""
        pred = self.predict(split, restart=not final)
        train_loss = self.curve[0] / self.curve[1] if self.curve[1] else None
        self.curve = [0.0, 0]
        if not self.ctx.is_main:
            return {}
        result = {"step": self.at, "split": split, **metrics_of(pred), "time": time.time()}
        if train_loss is not None:
            result["train_loss"] = train_loss
        if final and self.stopper.best_step is not None:
            result["best_step"] = self.stopper.best_step  # the weights evaluated: the best on validation
        if final:
            write_predictions(pred, self.run / "predictions.parquet")
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        for k in ("auc", "gauc", "logloss", "calibration"):
            self.writer.add_scalar(f"{split}/{k}", result[k], self.at)
        return result

    # --- export -----------------------------------------------------------------------------------
    def export(self) -> str | None:
        """Write the bundle (rank 0; every rank gathers the sharded tables), close TensorBoard,
        and with --overwrite swap the finished run in; the bundle's model_version."""
        from .export import gather_unsharded

        tensors = gather_unsharded(self.dmp)
        version = (
            write_bundle(self.run / "export", tensors, self.cfg, self.meta, self.spec)
            if self.ctx.is_main
            else None
        )
        if self.writer:
            self.writer.close()
        if self.ctx.is_main and self.run != self.target:
            _replace_run(self.run, self.target)
        return version

    def fit(self) -> dict | None:
        """setup → resume → steps → final checkpoint and eval → export; the summary on rank 0."""
        self.start()
        return self.finish()

    def start(self) -> None:
        """setup → resume: the model is built and sharded, nothing trained yet (`finish` trains)."""
        self.resume(self.setup())

    def finish(self) -> dict | None:
        """After `start`: steps → final checkpoint and eval → export; the summary on rank 0."""
        samples_per_s = self.train_steps()
        if self.saved_at != self.at:
            self.checkpoint()
        best = self.stopper.best_step
        if best is not None and best != self.at:  # evaluate and export the best on validation
            ckpt.load_checkpoint(ckpt.checkpoint_dir(self.run, best), self.dmp, self.optimizer)
        self.last_eval = self.evaluate(final=True)
        version = self.export()
        summary = {
            "run": str(self.target),
            "steps": self.at,
            "world_size": self.ctx.world_size,
            "train_samples_per_s": round(samples_per_s, 1),
            "gflops_fwd_per_sample": round(forward_flops(self.cfg.model) / 1e9, 4),
            "model_version": version,
            "eval": self.last_eval,  # of the best validation step's weights, with a validation split
            "best_step": self.stopper.best_step,
            "val_auc": self.stopper.best,
            "stopped_early": self.at < self.tc.steps,
            "wall_s": round(time.time() - self.t_start, 1),
        }
        return summary if self.ctx.is_main else None


def _quiet_torchrec(device_type: str) -> None:
    if device_type == "cpu":  # TorchRec warns about CUDA streams that a CPU run does not have
        logging.getLogger("torchrec.distributed.train_pipeline.postproc").setLevel(logging.ERROR)
    # Deprecation notices inside TorchRec 1.8 itself (DDP's broadcast_buffers, ShardedTensor): not ours to act on.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*", category=FutureWarning)


def train(cfg: RunConfig, data: str | Path, out: str | Path, **options) -> dict | None:
    """Train, evaluate, checkpoint and export (`Trainer.fit`; `options`: resume, progress,
    auto_resume, overwrite); the summary on rank 0, None elsewhere."""
    return Trainer(cfg, data, out, **options).fit()

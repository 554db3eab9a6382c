"""Run configuration: the `[model]` and `[train]` tables of a TOML file, plus command-line
overrides `section.key=value` (the value is read as TOML, else as a string)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import tomllib

from longer.config import ConfigError, ConfigSection, ModelConfig
from longer.spec import MODEL_SIZED, FeatureSpec, SpecError

EMB_OPTIMIZERS = ("rowwise_adagrad", "adam")
DECAYS = ("cosine", "linear", "none")
SHARDINGS = ("auto", "row_wise", "table_wise")


@dataclass(frozen=True)
class TrainConfig(ConfigSection):
    section: ClassVar[str] = "train"

    steps: int = 1000  # optimizer steps in the whole run (each = one batch on every rank)
    batch_size: int = 256  # per rank
    eval_batch_size: int = 1024
    eval_every: int = 0  # steps between evals (0: only at the end)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    log_every: int = 20
    lr: float = 1e-3  # dense AdamW peak learning rate
    weight_decay: float = 0.01
    warmup_steps: int = 50
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global norm of dense gradients (0: off)
    emb_optimizer: str = "rowwise_adagrad"  # fused into the backward pass by TorchRec
    emb_lr: float = 0.05
    sharding: str = "auto"  # the planner decides; row_wise / table_wise force every table
    bf16: bool = False  # autocast the forward pass
    seed: int = 0
    shuffle_window: int = 8
    deterministic: bool = False
    prefetch: int = 1  # loader thread prefetch depth
    threads: int = 0  # torch threads per process (0: auto, from CPU affinity and quota; trainer/threads.py)
    # Validation split and early stopping (trainer/early_stop.py): the end of the train split by
    # time is held out (val_days: its last days; val_frac: its latest fraction of samples),
    # evaluated every eval_every steps; the run keeps the weights of the best validation AUC and
    # stops after early_stop evals without improvement (0: runs all `steps`, still keeping the best).
    val_days: float = 0.0
    val_frac: float = 0.0
    early_stop: int = 0
    # request-level batching: the samples of one request (user, ts) are encoded once, and
    # batch_size / eval_batch_size count requests (feature_store/loader.py "Units")
    rlb: bool = True

    def __post_init__(self):
        need = self.need
        self.need_ints(("steps", "batch_size", "eval_batch_size", "log_every", "shuffle_window"), minimum=1)
        self.need_ints(("eval_every", "checkpoint_every", "warmup_steps", "prefetch", "threads"), minimum=0)
        for name in ("lr", "emb_lr"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.need_choice("decay", DECAYS)
        self.need_choice("emb_optimizer", EMB_OPTIMIZERS)
        self.need_choice("sharding", SHARDINGS)
        need(self.val_days >= 0, f"val_days must be >= 0, got {self.val_days}")
        need(0 <= self.val_frac < 1, f"val_frac must be in [0, 1), got {self.val_frac}")
        need(not (self.val_days and self.val_frac), "give val_days or val_frac, not both")
        need(self.early_stop >= 0, f"early_stop must be >= 0, got {self.early_stop}")
        need(
            not self.early_stop or ((self.val_days or self.val_frac) and self.eval_every),
            "early_stop needs a validation split (val_days or val_frac) and eval_every >= 1",
        )

    @property
    def has_val(self) -> bool:
        return bool(self.val_days or self.val_frac)

    def lr_at(self, step: int) -> float:
        """Dense learning rate for 0-based `step`: linear warm-up, then the chosen decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay == "none" or self.steps <= self.warmup_steps:
            return self.lr
        t = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if self.decay == "cosine" else 1 - t
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * shape)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    features: FeatureSpec = field(default_factory=FeatureSpec)  # as declared (`resolved_spec` completes it)

    def to_dict(self) -> dict:
        """The run config; `features` only when it is not the default spec, so a default run's
        config (and model_version) is what it was before the spec existed."""
        out = {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}
        if self.features != FeatureSpec():
            out["features"] = {
                k: v for k, v in self.features.to_json().items() if k not in ("lists", "dense_stats")
            }
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> RunConfig:
        unknown = sorted(set(d) - {"model", "train", "features"})
        if unknown:
            raise ConfigError(
                f"{where}: unknown table [{unknown[0]}] (expected [model], [train], [features])"
            )
        try:
            features = FeatureSpec.from_config(d.get("features"))
        except SpecError as e:
            raise ConfigError(f"{where}: {e}") from e
        return cls(
            model=ModelConfig.from_dict(d.get("model", {}), f"{where} [model]"),
            train=TrainConfig.from_dict(d.get("train", {}), f"{where} [train]"),
            features=features,
        )

    def resolved_spec(self, meta: dict) -> FeatureSpec:
        """The declared spec completed from a build's meta.json (buckets, list columns, dense
        statistics); the ModelConfig sizes the tables of item_id, category_id, action, user_id."""
        sizes = {c: getattr(self.model, f) for c, f in MODEL_SIZED.items()}
        return self.features.resolve(meta, model_buckets=sizes)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> RunConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from e
        for o in overrides:
            section, key, value = parse_override(o)
            data.setdefault(section, {})[key] = value
        return cls.from_dict(data, str(path))

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def parse_override(text: str) -> tuple[str, str, object]:
    """`model.merge_k=4` → ("model", "merge_k", 4); `model.norm=pre` → ("model", "norm", "pre")."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-3")
    lhs, raw = text.split("=", 1)
    section, key = lhs.split(".", 1)
    if section not in ("model", "train"):
        raise ConfigError(f"override {text!r}: section must be 'model' or 'train', got {section!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value

"""`longer bench fragility`: what separates a stuck seed from a good one (issue 16, item 3).

Trains one config (by default LONGER at the old fixed budget of `longer bench quality`: 100
steps × 128 requests, no validation split, no early stopping) with the real `Trainer`, once per
seed and per *variant* (a suspect changed: the warm-up, the embedding lr, the table sizes, the
initialisation of the user token, of the global CLS token or of InnerTrans; or the converged
early-stopping budget), and records

  every step     pre-clip gradient norms per dense module group (`module_group`: the global
                 CLS token, the user-token projection, the rest of the tokenizer, InnerTrans,
                 the merge projection, each attention layer, the head) and the norm of the
                 gradient reaching each embedding table's looked-up rows (summed over its keys);
                 averaged between probes
  every probe    (`--probe-every` steps, and at step 0) eval AUC / GAUC / LogLoss, the layer-1
                 (cross-causal) attention of the two global tokens [CLS, user token] over a few
                 eval batches — entropy in nats, entropy / log(#visible keys), and the mass they
                 put on the global keys themselves — and the per-user score offsets
                 (`user_offsets`)
  at the end     the same on the run's final weights (with early stopping: the best validation
                 step's, from the run's predictions.parquet)

into DIR/fragility.json, and draws DIR/fragility.png (one line per seed, one colour per variant).

    longer bench fragility --data bench-out/synth-taobao --config configs/quality.toml \\
        --out bench-out/fragility --variants base,warmup0 --seeds 0,1,2

Variants (`VARIANTS`) are config overrides plus `init.*` changes applied to the freshly built,
sharded model before step 1 (`apply_init`), so a variant's seed s starts from seed s's
weights except for what the variant changes. Runs one training at a time (one torch thread by
default: the CPU is shared); finished runs are journalled in DIR/runs.jsonl and reused.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench import write_atomic

# The old fixed budget of `longer bench quality` (configs/quality.toml before issue 16).
FIXED_BUDGET = ("train.steps=100", "train.val_frac=0", "train.early_stop=0", "train.eval_every=0")
CONVERGED = ("train.steps=3000", "train.val_frac=0.1", "train.eval_every=50", "train.early_stop=5")

# name → (overrides on top of the fixed budget, what it tests)
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "base": ((), "configs/quality.toml at the old fixed budget"),
    "warmup0": (("train.warmup_steps=0",), "no dense lr warm-up"),
    "warmup5": (("train.warmup_steps=5",), "5-step warm-up"),
    "warmup50": (("train.warmup_steps=50",), "50-step warm-up"),
    "emb_lr0.05": (("train.emb_lr=0.05",), "embedding lr 0.05 (row-wise Adagrad)"),
    "emb_lr0.5": (("train.emb_lr=0.5",), "embedding lr 0.5"),
    "big_tables": (
        ("model.item_buckets=400009", "model.category_buckets=16381", "model.user_buckets=100003"),
        "tables large enough that hashing barely collides",
    ),
    "user_std0.1": (("init.user_std=0.1",), "user table N(0, 0.1²) instead of N(0, 1)"),
    "user_proj0": (("init.user_proj=zero",), "user-token projection starts at 0"),
    "cls_std1": (("init.cls_std=1",), "CLS token N(0, 1) instead of N(0, 0.02²)"),
    "inner_identity": (
        ("init.inner=identity",),
        "InnerTrans starts as the identity (zero residual branches)",
    ),
    "steps500": (("train.steps=500",), "500 steps, no early stopping"),
    "converged": (CONVERGED, "configs/quality.toml as is: early stopping on a 10% validation split"),
}
VARIANTS["converged_big_tables"] = (
    CONVERGED + VARIANTS["big_tables"][0],
    "converged, with tables large enough that hashing barely collides",
)
VARIANTS["converged_big_categories"] = (
    CONVERGED + ("model.category_buckets=16381",),
    "converged, only the category table large enough that hashing barely collides",
)

INIT_KEYS = ("user_std", "item_std", "cls_std", "user_proj", "inner")
ATTN_BATCHES = 4  # eval batches whose layer-1 global-token attention a probe measures


# --- pure functions (tests/test_fragility.py) ------------------------------------------------------
def module_group(name: str) -> str:
    """The module group of a dense parameter name (as DMP names it, e.g. model.net.blocks.0...)."""
    net = name.split("net.", 1)[-1]
    if net == "cls":
        return "CLS token"
    if net.startswith("features.user_proj"):
        return "user-token proj"
    if net.startswith("features."):
        return "tokenizer"
    if net.startswith("merge.inner."):
        return "InnerTrans"
    if net.startswith("merge."):
        return "merge proj"
    if net.startswith("blocks."):
        i = int(net.split(".")[1])
        return "layer 1 (cross-causal)" if i == 0 else f"layer {i + 1} (self-causal)"
    if net.startswith(("head.", "final_norm")):
        return "head"
    return "other"


def embedding_table(key: str) -> str:
    """hist_item_id and item_id share the item table (longer/embedding.py): one table name."""
    return key.removeprefix("hist_").removesuffix("_id")


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _ctr_logits(inv, count, labels, base, prior):
    return _logit((np.bincount(inv, weights=labels, minlength=len(count)) + prior * base) / (count + prior))


def user_offsets(users, labels, logits, train=None, prior: float = 10.0, min_samples: int = 5) -> dict:
    """Per-user score offsets of one set of predictions.

    A user's offset is the mean of their logits. It should track the user's click rate (here the
    eval split's, shrunk to the global rate with `prior` pseudo-samples, as a logit). Over users
    with at least `min_samples` samples:

      offset_std        spread of the per-user mean logits
      ctr_logit_std     spread of the per-user click-rate logits (what a right offset would have)
      offset_corr       Pearson correlation of the two
      auc_offset_only   AUC when every sample is scored by its user's mean logit (ranking across users)
      auc_centred       AUC of logit − the user's mean logit (ranking within users only)
    and, over all samples, auc (as trained). (Offsets set to the eval click rates themselves
    would leak the labels: on a ~20-samples-per-user eval day they alone give AUC ≈ 0.74.) With `train` = (users, labels) of the train split:
      offset_corr_train corr of the per-user mean logit with the user's train click-rate logit
      auc_train_offset  AUC of logit − user mean + the user's train click-rate logit (no eval
                        labels used: what the offsets a user's past clicks imply would give)"""
    from trainer.metrics import auc

    users, labels = np.asarray(users), np.asarray(labels, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    uniq, inv, count = np.unique(users, return_inverse=True, return_counts=True)
    mean_logit = np.bincount(inv, weights=logits) / count
    ctr_logit = _ctr_logits(inv, count, labels, labels.mean(), prior)
    keep = count >= min_samples
    x, y = mean_logit[keep], ctr_logit[keep]
    corr = float(np.corrcoef(x, y)[0, 1]) if keep.sum() > 2 and x.std() > 0 and y.std() > 0 else float("nan")
    centred = logits - mean_logit[inv]
    extra = {}
    if train is not None:
        t_users, t_labels = np.asarray(train[0]), np.asarray(train[1], dtype=np.float64)
        t_uniq, t_inv, t_count = np.unique(t_users, return_inverse=True, return_counts=True)
        t_ctr = _ctr_logits(t_inv, t_count, t_labels, t_labels.mean(), prior)
        pos = np.clip(np.searchsorted(t_uniq, uniq), 0, len(t_uniq) - 1)
        known = t_uniq[pos] == uniq
        ref = np.where(known, t_ctr[pos], _logit(np.array(t_labels.mean())))  # unseen users: the global rate
        k2 = keep & known
        extra = {
            "offset_corr_train": float(np.corrcoef(mean_logit[k2], ref[k2])[0, 1])
            if k2.sum() > 2
            else float("nan"),
            "auc_train_offset": auc(labels, centred + ref[inv]),
        }
    return {
        **extra,
        "users": int(keep.sum()),
        "offset_std": float(x.std()) if keep.any() else float("nan"),
        "ctr_logit_std": float(y.std()) if keep.any() else float("nan"),
        "offset_corr": corr,
        "auc": auc(labels, logits),
        "auc_offset_only": auc(labels, mean_logit[inv]),
        "auc_centred": auc(labels, centred),
    }


def attention_stats(probs: np.ndarray, visible: np.ndarray, n_global: int) -> dict:
    """probs (B, H, Q, Tk) attention of Q query tokens, visible (B, Q, Tk) their mask → per query
    (averaged over users and heads): entropy (nats), entropy / log(#visible keys) and the mass on
    the first `n_global` keys (the global tokens)."""
    p = np.where(visible[:, None], probs, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)  # (B, H, Q)
        n_vis = visible.sum(-1)[:, None, :]  # (B, 1, Q)
        norm = np.where(n_vis > 1, ent / np.log(np.maximum(n_vis, 2)), np.nan)
    mass = p[..., :n_global].sum(-1)
    return {
        "entropy": ent.mean(axis=(0, 1)).tolist(),
        "norm_entropy": np.nanmean(norm, axis=(0, 1)).tolist(),
        "global_mass": mass.mean(axis=(0, 1)).tolist(),
    }


def parse_variant(name: str) -> tuple[list[str], dict]:
    """A variant's (config overrides on top of the fixed budget, init changes)."""
    if name not in VARIANTS:
        from longer.errors import UsageError

        raise UsageError(f"--variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
    overrides, init = list(FIXED_BUDGET), {}
    for o in VARIANTS[name][0]:
        key, value = o.split("=", 1)
        if key.startswith("init."):
            init[key.removeprefix("init.")] = value
        else:
            overrides = [x for x in overrides if not x.startswith(key + "=")] + [o]
    return overrides, init


# --- the model side ------------------------------------------------------------------------------
def apply_init(dmp, init: dict) -> None:
    """Change the freshly built, sharded model's initial weights as a variant says (in place)."""
    import torch

    if not init:
        return
    net = dmp.module.model.net
    with torch.no_grad():
        for table, key in (("user", "user_std"), ("item", "item_std")):
            if key in init:
                for name, t in dmp.state_dict().items():
                    if name.endswith(f"embeddings.{table}.weight"):
                        for shard in t.local_shards():
                            shard.tensor.normal_(0.0, float(init[key]))
        if "cls_std" in init:
            net.cls.normal_(0.0, float(init["cls_std"]))
        if init.get("user_proj") == "zero":
            net.features.user_proj.weight.zero_()
            net.features.user_proj.bias.zero_()
        if init.get("inner") == "identity" and net.merge.inner is not None:
            for blk in net.merge.inner.blocks:  # pre-norm blocks: x + attn(...), + ffn(...)
                for lin in (blk.attn.o_proj, blk.ffn.down):
                    lin.weight.zero_()
                    lin.bias.zero_()
    unknown = set(init) - set(INIT_KEYS)
    if unknown:
        raise ValueError(f"init: unknown key(s) {sorted(unknown)} (known: {INIT_KEYS})")


def global_attention(net, batch, emb) -> tuple[np.ndarray, np.ndarray, int]:
    """Layer-1 (cross-causal) attention probabilities of the two global tokens [CLS, user token]:
    (B, H, 2, Tk), their visibility (B, 2, Tk) and the number of global keys."""
    import torch

    u = net._user_tokens(batch, emb)
    blk = net.blocks[0]
    k, _ = blk.kv(u["kv1"])
    q = blk.attn.q(blk._in(u["queries"]))[:, :, :2]  # (B, H, 2, dh)
    visible = blk.user_mask(u["q_attr"], u["kv1_attr"])[:, :2]  # (B, 2, Tk)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    n_global = int(u["kv1_attr"][0].sum())
    return probs.float().numpy(), visible.numpy(), n_global


class Recorder:
    """Hooks on one Trainer: per-step gradient norms, probes every `every` steps."""

    def __init__(self, trainer, every: int, train=None):
        import torch

        self.tr, self.every, self.train = trainer, every, train  # train: (users, labels) of the train split
        self.net = trainer.dmp.module.model.net
        self.names = dict(trainer.dense_opt.params)
        self.acc: dict[str, list[float]] = {}
        self.emb_sq: dict[str, float] = {}
        self.loss: list[float] = []  # per step
        self._curve = (0.0, 0)
        self.probes: list[dict] = []
        self.attn: list = []
        self.emb_rms: dict[str, tuple[float, int]] = {}  # table → (Σ x², n) of a probe's looked-up rows
        self.capture_attn = 0
        self.t0 = time.time()
        step = trainer.dense_opt.step

        def recorded_step(closure=None):
            self._dense_norms()
            return step(closure)

        trainer.dense_opt.step = recorded_step
        self.net.register_forward_pre_hook(self._pre_forward)
        self._torch = torch

    def _pre_forward(self, module, args):
        batch, emb = args[0], args[1]
        if self._torch.is_grad_enabled():
            for key, jt in emb.items():
                vals = jt.values()
                if vals.requires_grad:
                    table = embedding_table(key)
                    vals.register_hook(lambda g, t=table: self._emb_grad(t, g))
        elif self.capture_attn > 0:
            self.capture_attn -= 1
            with self._torch.no_grad():
                self.attn.append(global_attention(module, batch, emb))
                for key, jt in emb.items():  # the scale of the rows looked up
                    sq, n = self.emb_rms.get(embedding_table(key), (0.0, 0))
                    v = jt.values().float()
                    self.emb_rms[embedding_table(key)] = (sq + float(v.pow(2).sum()), n + v.numel())

    def _emb_grad(self, table: str, g):
        self.emb_sq[table] = self.emb_sq.get(table, 0.0) + float(g.float().pow(2).sum())

    def _dense_norms(self):
        sq: dict[str, float] = {}
        for name, p in self.names.items():
            if p.grad is not None:
                g = module_group(name)
                sq[g] = sq.get(g, 0.0) + float(p.grad.float().pow(2).sum())
        total = math.sqrt(sum(sq.values()))
        for g, v in sq.items():
            self.acc.setdefault(g, []).append(math.sqrt(v))
        self.acc.setdefault("dense total", []).append(total)
        self.acc.setdefault("clipped", []).append(float(total > self.tr.tc.grad_clip > 0))
        for t, v in self.emb_sq.items():
            self.acc.setdefault(f"emb:{t}", []).append(math.sqrt(v))
        self.emb_sq = {}

    def on_step(self, trainer) -> None:
        total, n = trainer.curve  # the train loss sum since the trainer's last eval
        if n < self._curve[1]:  # an eval reset it
            self._curve = (0.0, 0)
        if n > self._curve[1]:
            self.loss.append((total - self._curve[0]) / (n - self._curve[1]))
        self._curve = (total, n)
        if trainer.at >= trainer.tc.steps or trainer.stopper.should_stop:
            self.attn, self.emb_rms, self.capture_attn = (
                [],
                {},
                ATTN_BATCHES,
            )  # the final eval's (`final_probe`)
        elif trainer.at % self.every == 0:
            self.probe()

    def probe(self) -> dict:
        """Predict the eval split with the current weights and record a probe."""
        self.attn, self.emb_rms, self.capture_attn = [], {}, ATTN_BATCHES
        pred = self.tr.predict("eval", restart=True)
        self.capture_attn = 0
        return self._record(pred)

    def final_probe(self, pred: dict) -> dict:
        """The probe of the run's final eval (its predictions; attention captured during it)."""
        self.capture_attn = 0
        return self._record(pred)

    def _record(self, pred: dict) -> dict:
        tr = self.tr
        grads = {k: float(np.mean(v)) for k, v in self.acc.items()}
        self.acc = {}
        rec = {
            "step": tr.at,
            "lr": tr.tc.lr_at(max(tr.at - 1, 0)),
            "wall_s": round(time.time() - self.t0, 1),
            "grad_norm": grads,
            **({"attention": self._attention()} if self.attn else {}),
            "emb_rms": {t: math.sqrt(sq / max(n, 1)) for t, (sq, n) in self.emb_rms.items()},
            **user_offsets(pred["user_id"], pred["label"], pred["logit"], self.train),
        }
        from trainer.metrics import all_metrics

        rec.update(
            {
                k: v
                for k, v in all_metrics(pred["user_id"], pred["label"], pred["logit"]).items()
                if k != "auc"
            }
        )
        self.probes.append(rec)
        return rec

    def _attention(self) -> dict:
        width = max(a[0].shape[-1] for a in self.attn)

        def pad(x, axis_len):
            out = np.zeros(x.shape[:-1] + (axis_len,), dtype=x.dtype)
            out[..., : x.shape[-1]] = x
            return out

        probs = np.concatenate([pad(a[0], width) for a in self.attn])
        vis = np.concatenate([pad(a[1], width) for a in self.attn])
        s = attention_stats(probs, vis, self.attn[0][2])
        return {f"{stat}_{tok}": s[stat][i] for stat in s for i, tok in enumerate(("cls", "user"))}


def train_labels(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """(user_id, label) of every train-split sample of a built dataset."""
    import pyarrow.parquet as pq

    parts = [
        pq.read_table(p, columns=["user_id", "label"])
        for p in sorted((data / "train").glob("part-*.parquet"))
    ]
    return (
        np.concatenate([t.column("user_id").to_numpy() for t in parts]),
        np.concatenate([t.column("label").to_numpy() for t in parts]),
    )


# --- runs ------------------------------------------------------------------------------------------
def run_one(data: Path, config: Path, variant: str, seed: int, workdir: Path, every: int, extra=()) -> dict:
    from trainer.config import RunConfig
    from trainer.train import Trainer

    overrides, init = parse_variant(variant)
    overrides = [*overrides, *extra, f"train.seed={seed}", "train.threads=1", "train.log_every=1000000"]
    cfg = RunConfig.load(config, overrides)
    out = workdir / f"{variant}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    tr = Trainer(cfg, data, out, progress=False)
    tr.start()
    apply_init(tr.dmp, init)
    if cfg.train.has_val:  # probe no more often than the validation evals
        every = max(every, cfg.train.eval_every)
    rec = Recorder(tr, every, train_labels(data))
    if every < cfg.train.steps:
        rec.probe()  # step 0: the initial weights
    tr.on_step = rec.on_step
    summary = tr.finish()
    import pyarrow.parquet as pq

    pred = {k: np.asarray(v) for k, v in pq.read_table(out / "predictions.parquet").to_pydict().items()}
    final = rec.final_probe(pred)
    final["best_step"] = summary["best_step"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "variant": variant,
        "seed": seed,
        "overrides": overrides,
        "init": init,
        "steps": summary["steps"],
        "best_step": summary["best_step"],
        "wall_s": round(time.time() - t0, 1),
        "final": final,
        "probes": rec.probes,
        "train_loss": rec.loss,
    }


def summarise(runs: list[dict]) -> list[dict]:
    """Per variant: final AUC / GAUC / offset figures, mean ± std and range over seeds."""
    rows = []
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
        row = {"variant": v, "what": VARIANTS.get(v, ((), ""))[1], "seeds": [r["seed"] for r in rs]}
        for k in (
            "auc",
            "gauc",
            "auc_offset_only",
            "auc_centred",
            "offset_corr",
            "offset_std",
            "auc_train_offset",
        ):
            xs = [r["final"][k] for r in rs]
            row[k] = xs
            row[f"{k}_mean"] = float(np.mean(xs))
            row[f"{k}_std"] = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
        row["steps"] = [r["steps"] for r in rs]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The summary table: final figures per variant (mean over seeds unless per seed)."""
    lines = [
        "| variant | AUC per seed | AUC mean ± std | GAUC | offset-only AUC | centred AUC "
        "| train-CTR-offset AUC | corr(offset, CTR) | offset std | steps |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {' / '.join(f'{x:.4f}' for x in r['auc'])} "
            f"| {r['auc_mean']:.4f} ± {r['auc_std']:.4f} | {r['gauc_mean']:.4f} "
            f"| {r['auc_offset_only_mean']:.4f} | {r['auc_centred_mean']:.4f} | {r['auc_train_offset_mean']:.4f} "
            f"| {r['offset_corr_mean']:+.2f} | {r['offset_std_mean']:.2f} | {'/'.join(map(str, r['steps']))} |"
        )
    return "\n".join(lines)


PLOT_ROWS = (
    ("auc", "eval AUC"),
    ("gauc", "eval GAUC"),
    ("offset_corr", "corr(user mean logit,\nuser CTR logit)"),
    ("offset_std", "std of user mean logits"),
    ("grad_norm:user-token proj", "grad norm:\nuser-token proj"),
    ("grad_norm:emb:user", "grad norm:\nuser table rows"),
    ("grad_norm:CLS token", "grad norm: CLS"),
    ("grad_norm:dense total", "grad norm: dense total\n(pre-clip)"),
    ("attention:global_mass_cls", "layer-1 CLS attention\nmass on global keys"),
    ("attention:norm_entropy_cls", "layer-1 CLS attention\nentropy / log(#keys)"),
)


def _get(probe: dict, key: str):
    if ":" in key:
        group, k = key.split(":", 1)
        return probe.get(group, {}).get(k, float("nan"))
    return probe.get(key, float("nan"))


def plot(runs: list[dict], path: Path, variants: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(PLOT_ROWS)
    cols = 2
    fig, axes = plt.subplots((n + 1) // cols, cols, figsize=(11, 2.3 * ((n + 1) // cols)), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    for ax, (key, label) in zip(axes.flat, PLOT_ROWS):
        for r in runs:
            if r["variant"] not in variants:
                continue
            c = colours[variants.index(r["variant"]) % len(colours)]
            xs = [p["step"] for p in r["probes"]]
            ys = [_get(p, key) for p in r["probes"]]
            ax.plot(
                xs,
                ys,
                color=c,
                ls=styles[r["seed"] % len(styles)],
                lw=1.3,
                label=f"{r['variant']} s{r['seed']}",
            )
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(
    data: str,
    config: str,
    out: str,
    variants: list[str],
    seeds: list[int],
    every: int = 10,
    overrides: list[str] = (),
    plot_variants: list[str] | None = None,
    progress: bool = True,
) -> dict:
    from trainer.threads import configure_threads

    configure_threads(1, "bench fragility", log=False)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = out_dir / "runs.jsonl"
    done = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            r = json.loads(line)
            done[(r["variant"], r["seed"], tuple(r.get("extra", ())))] = r
    for v in variants:
        parse_variant(v)
    runs = []
    for v in variants:
        for s in seeds:
            key = (v, s, tuple(overrides))
            if key not in done:
                if progress:
                    print(f"fragility: {v} seed {s}", file=sys.stderr, flush=True)
                r = run_one(Path(data), Path(config), v, s, out_dir / "runs", every, overrides)
                r["extra"] = list(overrides)
                with open(journal, "a") as f:
                    f.write(json.dumps(r) + "\n")
                done[key] = r
                if progress:
                    f_ = r["final"]
                    print(
                        f"   auc {f_['auc']:.4f} gauc {f_['gauc']:.4f} offset-only {f_['auc_offset_only']:.4f} "
                        f"corr {f_['offset_corr']:+.2f} ({r['wall_s']} s)",
                        file=sys.stderr,
                        flush=True,
                    )
            runs.append(done[key])
    rows = summarise(runs)
    png = out_dir / "fragility.png"
    plot(runs, png, plot_variants or variants)
    result = {
        "data": str(data),
        "config": str(config),
        "overrides": list(overrides),
        "rows": rows,
        "runs": runs,
    }
    write_atomic(out_dir / "fragility.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out_dir / "fragility.md", markdown(rows) + "\n")
    return {"out": str(out_dir), "png": str(png), "table": markdown(rows).splitlines()}

"""Training curves of the quality bench's runs: per seed, the mean train loss between
validation evals and the validation AUC / GAUC (from the run's metrics.jsonl), kept in
results.json and drawn in `curves.png` (one column per variant, one line per seed, the best
validation step marked)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.claims import row_key, variant_key

MAX_PANELS = 8  # variants drawn: the baselines table's (else the first distinct ones)


def curve_of(run_dir: str | Path) -> list[dict]:
    """[{step, train_loss, val_auc, val_gauc}] of one run's validation evals (empty without any)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        m = json.loads(line)
        if m.get("split") == "val":
            out.append(
                {
                    "step": m["step"],
                    "train_loss": m.get("train_loss"),
                    "val_auc": m["auc"],
                    "val_gauc": m["gauc"],
                }
            )
    return out


def _panels(result: dict) -> list[tuple[str, list[dict]]]:
    """(variant label, its runs) for the variants to draw, each config once."""
    runs_by_model = {}
    for r in result["runs"]:  # a run's variant: its model and [features] (bench.claims.variant_key)
        runs_by_model.setdefault(variant_key(r["model"], r.get("features")), []).append(r)
    rows = sorted(result["rows"], key=lambda r: r["table"] != "baselines")
    out, seen = [], set()
    for row in rows:
        key = row_key(row)
        if key in seen or key not in runs_by_model:
            continue
        seen.add(key)
        out.append((row["variant"], sorted(runs_by_model[key], key=lambda r: r["seed"])))
    return out[:MAX_PANELS]


def plot_curves(result: dict, out: Path) -> str | None:
    """curves.png, or None when no run has a validation curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(label, runs) for label, runs in _panels(result) if any(r.get("curve") for r in runs)]
    if not panels:
        return None
    fig, axes = plt.subplots(
        3, len(panels), figsize=(max(3.6 * len(panels), 6.4), 8.5), squeeze=False, sharex="col"
    )
    for col, (label, runs) in enumerate(panels):
        for r in runs:
            c = r["curve"]
            steps = [p["step"] for p in c]
            for row, (key, name) in enumerate(
                (("train_loss", "train loss"), ("val_auc", "validation AUC"), ("val_gauc", "validation GAUC"))
            ):
                ax = axes[row][col]
                (line,) = ax.plot(
                    steps,
                    [float("nan") if p[key] is None else p[key] for p in c],
                    label=f"seed {r['seed']}",
                    lw=1.2,
                )
                if r.get("best_step") is not None and row > 0:
                    ax.axvline(r["best_step"], color=line.get_color(), ls=":", lw=0.8)
                if col == 0:
                    ax.set_ylabel(name)
                ax.grid(alpha=0.3)
        axes[0][col].set_title(label, fontsize=10)
        axes[-1][col].set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['dataset']['name']}: training curves per seed\n(dotted: best validation step)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return "curves.png"

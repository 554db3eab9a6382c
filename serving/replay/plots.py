"""The replay report's figures (matplotlib, PNG):

* `latency_cdf.png`: per arm, the CDF of /v1/score latency on a log axis whose tick labels are
  chosen by the range shown (1-2-3-5, 1-2-5 or decades), so they never overlap;
* `calibration.png`: observed click rate against mean prediction in quantile bins of the
  prediction (equal counts per bin; the count is in the legend), with 95 % binomial error bars;
* `deltas.png`: every B − A difference as an *improvement*, so right is better for all of them
  (LogLoss, where lower is better, is plotted with its sign flipped and says so).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .driver import Outcome
from .report import HIGHER_IS_BETTER, LABELS, arm_rows

MAX_CALIBRATION_BINS = 15
MIN_PER_BIN = 20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_figure(latencies: dict[str, np.ndarray]):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    shown = [np.sort(v) for v in latencies.values() if len(v)]
    for arm, lat in latencies.items():
        lat = np.sort(lat)
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=arm)
    ax.set(
        xlabel="latency (ms, log scale)",
        ylabel="fraction of requests",
        title="/v1/score latency CDF",
        xscale="log",
    )
    if shown:
        lo, hi = min(v[0] for v in shown), max(v[-1] for v in shown)
        decades = np.log10(max(hi, 1e-9) / max(lo, 1e-9))
        subs = (1.0, 2.0, 3.0, 5.0) if decades < 1 else (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def calibration_figure(rows_by_arm: dict[str, dict]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = 0.0
    for arm, r in rows_by_arm.items():
        if not len(r["label"]):
            continue
        p = 1 / (1 + np.exp(-r["logit"]))
        n_bins = int(np.clip(len(p) // MIN_PER_BIN, 1, MAX_CALIBRATION_BINS))
        edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
        which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
        xs, ys, err, counts = [], [], [], []
        for b in np.unique(which):
            sel = which == b
            rate = r["label"][sel].mean()
            xs.append(p[sel].mean())
            ys.append(rate)
            err.append(1.96 * np.sqrt(max(rate * (1 - rate), 1e-12) / sel.sum()))
            counts.append(int(sel.sum()))
        count = f"{min(counts):,}" if min(counts) == max(counts) else f"{min(counts):,}–{max(counts):,}"
        ax.errorbar(
            xs,
            ys,
            yerr=err,
            marker="o",
            ms=4,
            capsize=2,
            label=f"{arm}: {len(xs)} quantile bins, {count} candidates each",
        )
        top = max(top, max(xs), max(ys) + max(err))
    top = min(1.0, top * 1.05 + 0.02)
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="perfectly calibrated")
    ax.set(
        xlabel="mean predicted probability (bin)",
        ylabel="observed click rate (bin, 95 % CI)",
        title="calibration",
        xlim=(0, top),
        ylim=(0, top),
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def deltas_figure(deltas: dict[str, dict]):
    plt = _pyplot()
    labels, gains, lo, hi = [], [], [], []
    for pair, d in deltas.items():
        for k, v in d.items():
            flip = not HIGHER_IS_BETTER[k]
            name = f"{pair}  {LABELS[k]}" + (" (lower is better: sign flipped)" if flip else "")
            if v["ci_low"] is None:
                labels.append(f"{name}: not judged, too few requests")
                gains.append(np.nan)
                lo.append(0.0)
                hi.append(0.0)
                continue
            sign = -1.0 if flip else 1.0
            g, a, b = sign * v["diff"], sign * v["ci_low"], sign * v["ci_high"]
            labels.append(name)
            gains.append(g)
            lo.append(g - min(a, b))
            hi.append(max(a, b) - g)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.45 * max(len(labels), 1)))
    if labels:
        ax.errorbar(gains, range(len(labels)), xerr=[lo, hi], fmt="o", capsize=3)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set(title="B − A with 95 % bootstrap CI", xlabel="improvement of B over A  (← A better | B better →)")
    fig.tight_layout()
    return fig


def write_plots(summary: dict, outcomes: list[Outcome], out: Path) -> None:
    plt = _pyplot()
    arms = list(summary["arms"])
    figures = {
        "latency_cdf.png": latency_figure(
            {
                a: np.array([o.latency_ms for o in outcomes if o.arm == a and o.scores is not None])
                for a in arms
            }
        ),
        "calibration.png": calibration_figure(
            {a: arm_rows([o for o in outcomes if o.arm == a]) for a in arms}
        ),
        "deltas.png": deltas_figure(summary["deltas"]),
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

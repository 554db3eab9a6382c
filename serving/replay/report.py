"""The replay report: per-arm metrics, B − A differences with bootstrap CIs, and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainer.metrics import all_metrics

from .driver import Outcome
from .stats import bootstrap_diff, ndcg_at_k

DELTA_METRICS = ("auc", "gauc", "logloss", "ndcg@10")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def arm_rows(outcomes: list[Outcome]) -> dict:
    """Successful outcomes flattened to one row per candidate, plus per-request NDCG."""
    ok = [o for o in outcomes if o.scores is not None]
    rows = {"user_id": [], "label": [], "logit": [], "request": []}
    for o in ok:
        rows["user_id"] += [o.user_id] * len(o.scores)
        rows["label"] += list(o.labels)
        rows["logit"] += _logit(np.asarray(o.scores)).tolist()
        rows["request"] += [o.index] * len(o.scores)
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["ndcg"] = {o.index: ndcg_at_k(o.labels, o.scores, 10) for o in ok}
    return out


def metric(name: str):
    def value(cols: dict, rows: np.ndarray) -> float:
        if name == "ndcg@10":
            vals = [cols["ndcg"][r] for r in np.unique(cols["request"][rows])]
            vals = [v for v in vals if np.isfinite(v)]
            return float(np.mean(vals)) if vals else float("nan")
        m = all_metrics(cols["user_id"][rows], cols["label"][rows], cols["logit"][rows])
        return m[name]
    return value


def summarize(outcomes: list[Outcome], arms: list[str], n_boot: int = 500, seed: int = 0) -> dict:
    per_arm, rows = {}, {}
    for arm in arms:
        mine = [o for o in outcomes if o.arm == arm]
        rows[arm] = arm_rows(mine)
        lat = np.array([o.latency_ms for o in mine if o.scores is not None])
        states = [o.user_state for o in mine if o.user_state]
        m = all_metrics(rows[arm]["user_id"], rows[arm]["label"], rows[arm]["logit"]) if len(rows[arm]["label"]) \
            else {}
        per_arm[arm] = {
            "requests": len(mine), "errors": sum(o.error is not None for o in mine),
            "retries": sum(o.retries for o in mine), "event_errors": sum(o.event_errors for o in mine),
            **{k: m.get(k) for k in ("auc", "gauc", "logloss", "calibration", "n")},
            "ndcg@10": metric("ndcg@10")(rows[arm], np.arange(len(rows[arm]["label"]))) if len(lat) else None,
            "latency_ms": {f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)} if len(lat) else {},
            "state_hit_rate": states.count("hit") / len(states) if states else None,
            "errors_sample": [o.error for o in mine if o.error][:5],
        }
    base = arms[0]
    deltas = {f"{arm}-{base}": {name: bootstrap_diff(rows[base], rows[arm], metric(name), n_boot=n_boot, seed=seed)
                                for name in DELTA_METRICS}
              for arm in arms[1:] if len(rows[arm]["label"]) and len(rows[base]["label"])}
    return {"arms": per_arm, "deltas": deltas}


def write_report(summary: dict, outcomes: list[Outcome], out: str | Path, meta: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**meta, **summary}, indent=2, default=float) + "\n")
    lines = ["# Replay report", "", f"Log: `{meta.get('log')}`; requests: {meta.get('requests')}; "
             f"assignment: {meta.get('assignment')}", "",
             "| arm | requests | errors | AUC | GAUC | LogLoss | calibration | NDCG@10 | p50 ms | p99 ms | hit rate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, d=4: "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{d}f}"  # noqa: E731
    for arm, a in summary["arms"].items():
        lat = a["latency_ms"]
        lines.append(f"| {arm} | {a['requests']} | {a['errors']} | {fmt(a['auc'])} | {fmt(a['gauc'])} | "
                     f"{fmt(a['logloss'])} | {fmt(a['calibration'], 3)} | {fmt(a['ndcg@10'])} | "
                     f"{fmt(lat.get('p50'), 1)} | {fmt(lat.get('p99'), 1)} | {fmt(a['state_hit_rate'], 2)} |")
    for pair, d in summary["deltas"].items():
        lines += ["", f"**{pair}** (95% bootstrap CI, users resampled):", ""]
        lines += [f"- {k}: {fmt(v['diff'])} [{fmt(v['ci_low'])}, {fmt(v['ci_high'])}]" for k, v in d.items()]
    lines += ["", "![latency](latency_cdf.png) ![calibration](calibration.png) ![deltas](deltas.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plots(summary, outcomes, out)


def _plots(summary: dict, outcomes: list[Outcome], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["arms"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        lat = np.sort([o.latency_ms for o in outcomes if o.arm == arm and o.scores is not None])
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=arm)
    ax.set(xlabel="latency (ms)", ylabel="fraction of requests", title="latency CDF", xscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for arm in arms:
        r = arm_rows([o for o in outcomes if o.arm == arm])
        if len(r["label"]):
            p = 1 / (1 + np.exp(-r["logit"]))
            bins = np.clip((p * 10).astype(int), 0, 9)
            xs = [p[bins == b].mean() for b in range(10) if (bins == b).any()]
            ys = [r["label"][bins == b].mean() for b in range(10) if (bins == b).any()]
            ax.plot(xs, ys, marker="o", label=arm)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="mean predicted", ylabel="observed rate", title="calibration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels, diffs, lo, hi = [], [], [], []
    for pair, d in summary["deltas"].items():
        for k, v in d.items():
            labels.append(f"{pair} {k}")
            diffs.append(v["diff"])
            lo.append(v["diff"] - v["ci_low"])
            hi.append(v["ci_high"] - v["diff"])
    if labels:
        ax.errorbar(diffs, range(len(labels)), xerr=[lo, hi], fmt="o", capsize=3)
        ax.set_yticks(range(len(labels)), labels)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(title="B − A with 95% CI", xlabel="difference")
    fig.tight_layout()
    fig.savefig(out / "deltas.png", dpi=100)
    plt.close(fig)

"""The replay report: per-arm metrics, B − A differences with bootstrap CIs (`report.json`,
`report.md`) and the plots of `plots.py`.

* NDCG@10 is averaged over *ranking requests* only: requests whose candidates hold at least
  one positive and one negative (so at least two candidates). A request with one candidate, or
  with every label equal, scores the same under any order and says nothing about ranking. Their
  count is reported beside the metric, and with fewer than MIN_RANKING_REQUESTS in either arm
  the B − A difference of NDCG@10 carries no interval (it is reported as too small to judge).
* Every difference is B − A with a 95 % bootstrap interval resampling users, and a verdict:
  "B better" / "B worse" where the interval excludes 0 (in the metric's own direction: higher
  AUC, GAUC and NDCG@10 are better, lower LogLoss is), else "no clear difference".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainer.metrics import all_metrics

from .driver import Outcome
from .stats import bootstrap_diff, ndcg_at_k

DELTA_METRICS = ("auc", "gauc", "logloss", "ndcg@10")
HIGHER_IS_BETTER = {"auc": True, "gauc": True, "logloss": False, "ndcg@10": True}
LABELS = {"auc": "AUC", "gauc": "GAUC", "logloss": "LogLoss", "ndcg@10": "NDCG@10"}
MIN_RANKING_REQUESTS = 30

HIT_RATE_NOTE = (
    "User state: how each `/v1/score` answer got the user's state (serving/state_cache.py): `hit` "
    "(the cached state as it was), `incremental` (the cached state brought up to date with only the "
    "events appended since, append-stable bundles), `full` (the history encoded) or `bypass` (Redis "
    "unreachable). The replay posts each request's own events to the arm right after scoring it, as "
    "production would, so without the near-line refresh (`--no-refresh`) the user's next request "
    "is an incremental update (append-stable bundle) or a full encode. With it, /v1/events brings "
    "the state up to date off the request path, and the next request is a hit unless it arrives "
    "before the refresh has run (then it waits for that computation, or makes its own). "
    "'No full encode' is the share of hit + incremental answers."
)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def is_ranking_request(labels) -> bool:
    """At least one positive and one negative: the order of the candidates matters."""
    return 0 < sum(labels) < len(labels)


def arm_rows(outcomes: list[Outcome]) -> dict:
    """Successful outcomes flattened to one row per candidate, plus NDCG@10 per ranking request."""
    ok = [o for o in outcomes if o.scores is not None]
    rows = {"user_id": [], "label": [], "logit": [], "request": []}
    for o in ok:
        rows["user_id"] += [o.user_id] * len(o.scores)
        rows["label"] += list(o.labels)
        rows["logit"] += _logit(np.asarray(o.scores)).tolist()
        rows["request"] += [o.index] * len(o.scores)
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["ndcg"] = {o.index: ndcg_at_k(o.labels, o.scores, 10) for o in ok if is_ranking_request(o.labels)}
    return out


def metric(name: str):
    def value(cols: dict, rows: np.ndarray) -> float:
        if name == "ndcg@10":
            vals = [cols["ndcg"][r] for r in np.unique(cols["request"][rows]) if r in cols["ndcg"]]
            return float(np.mean(vals)) if vals else float("nan")
        m = all_metrics(cols["user_id"][rows], cols["label"][rows], cols["logit"][rows])
        return m[name]

    return value


def verdict(name: str, ci_low: float, ci_high: float) -> str:
    better_if_up = HIGHER_IS_BETTER[name]
    if ci_low > 0:
        return "B better" if better_if_up else "B worse"
    if ci_high < 0:
        return "B worse" if better_if_up else "B better"
    return "no clear difference"


def compare(rows_a: dict, rows_b: dict, name: str, n_boot: int, seed: int) -> dict:
    if name == "ndcg@10":
        n = min(len(rows_a["ndcg"]), len(rows_b["ndcg"]))
        if n < MIN_RANKING_REQUESTS:
            return {
                "diff": None,
                "ci_low": None,
                "ci_high": None,
                "ranking_requests": n,
                "verdict": f"too few ranking requests to judge ({n} < {MIN_RANKING_REQUESTS})",
            }
    d = bootstrap_diff(rows_a, rows_b, metric(name), n_boot=n_boot, seed=seed)
    return {**d, "verdict": verdict(name, d["ci_low"], d["ci_high"])}


def summarize(outcomes: list[Outcome], arms: list[str], n_boot: int = 500, seed: int = 0) -> dict:
    per_arm, rows = {}, {}
    for arm in arms:
        mine = [o for o in outcomes if o.arm == arm]
        rows[arm] = arm_rows(mine)
        lat = np.array([o.latency_ms for o in mine if o.scores is not None])
        states = [o.user_state for o in mine if o.user_state]
        m = (
            all_metrics(rows[arm]["user_id"], rows[arm]["label"], rows[arm]["logit"])
            if len(rows[arm]["label"])
            else {}
        )
        per_arm[arm] = {
            "requests": len(mine),
            "errors": sum(o.error is not None for o in mine),
            "retries": sum(o.retries for o in mine),
            "event_errors": sum(o.event_errors for o in mine),
            **{k: m.get(k) for k in ("auc", "gauc", "logloss", "calibration", "n")},
            "ndcg@10": metric("ndcg@10")(rows[arm], np.arange(len(rows[arm]["label"])))
            if rows[arm]["ndcg"]
            else None,
            "ranking_requests": len(rows[arm]["ndcg"]),
            "latency_ms": {f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)} if len(lat) else {},
            "state_hit_rate": states.count("hit") / len(states) if states else None,
            "user_state": {k: states.count(k) for k in ("hit", "incremental", "full", "bypass")},
            "no_full_encode_share": (states.count("hit") + states.count("incremental")) / len(states)
            if states
            else None,
            "errors_sample": [o.error for o in mine if o.error][:5],
        }
    base = arms[0]
    deltas = {
        f"{arm}-{base}": {name: compare(rows[base], rows[arm], name, n_boot, seed) for name in DELTA_METRICS}
        for arm in arms[1:]
        if len(rows[arm]["label"]) and len(rows[base]["label"])
    }
    return {"arms": per_arm, "deltas": deltas}


def _fmt(v, d: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{d}f}"


def markdown(summary: dict, meta: dict) -> str:
    lines = [
        "# Replay report",
        "",
        f"Log: `{meta.get('log')}`; requests: {meta.get('requests')}; assignment: {meta.get('assignment')}"
        + (f"; refresh: {meta['refresh']}" if "refresh" in meta else ""),
        "",
        "| arm | requests | errors | AUC | GAUC | LogLoss | calibration | NDCG@10 (ranking requests) "
        "| p50 ms | p99 ms | state hit rate | no full encode | hit / incremental / full / bypass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in summary["arms"].items():
        lat = a["latency_ms"]
        lines.append(
            f"| {arm} | {a['requests']} | {a['errors']} | {_fmt(a['auc'])} | {_fmt(a['gauc'])} | "
            f"{_fmt(a['logloss'])} | {_fmt(a['calibration'], 3)} | {_fmt(a['ndcg@10'])} "
            f"({a['ranking_requests']}) | {_fmt(lat.get('p50'), 1)} | {_fmt(lat.get('p99'), 1)} | "
            f"{_fmt(a['state_hit_rate'], 2)} | {_fmt(a['no_full_encode_share'], 2)} | "
            f"{' / '.join(str(n) for n in a['user_state'].values())} |"
        )
    for pair, d in summary["deltas"].items():
        lines += ["", f"**{pair}** (95 % bootstrap CI, users resampled):", ""]
        for k, v in d.items():
            way = "higher" if HIGHER_IS_BETTER[k] else "lower"
            value = (
                f"{v['diff']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}] — "
                if v["ci_low"] is not None
                else ""
            )
            lines.append(f"- {LABELS[k]} ({way} is better): {value}{v['verdict']}")
    lines += [
        "",
        "Notes:",
        "",
        f"- NDCG@10 averages only the requests whose candidates include a positive and a negative (the "
        f"count in brackets); others score the same under any order. Fewer than {MIN_RANKING_REQUESTS} "
        "such requests: no difference is judged.",
        f"- {HIT_RATE_NOTE}",
        "",
        "![latency](latency_cdf.png) ![calibration](calibration.png) ![deltas](deltas.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(summary: dict, outcomes: list[Outcome], out: str | Path, meta: dict) -> None:
    from .plots import write_plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**meta, **summary}, indent=2, default=float) + "\n")
    (out / "report.md").write_text(markdown(summary, meta))
    write_plots(summary, outcomes, out)

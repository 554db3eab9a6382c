"""The quality bench's claims against the paper (arXiv 2505.04421, §4), each judged from paired
differences with confidence intervals (`bench.verdict`): agrees / disagrees / inconclusive.

`comparison(rows, base, arms)`: `rows` are the bench's table rows (table, variant, auc, gflops,
config, features); `arms[row_key(row)]` is that variant's per-sample eval predictions over
its seeds (`bench.verdict.stack_seeds`).
"""

from __future__ import annotations

import hashlib
import json

from .verdict import MATCH_MARGIN, N_BOOT, combine, paired_delta, verdict

# The paper's figures (arXiv 2505.04421, Douyin ads): the ones the comparison quotes.
PAPER = {
    "transformer": {"auc": 0.85111, "gflops": 3.73},
    "longer": {"auc": 0.85290, "gflops": 1.91},
    "base": {"auc": 0.83968},  # Table 1's Base: the production model without the long sequence
    "queries": "k = 100 recent ≈ k = 250 (and near all); recent > uniform > learnable",
    "scaling": "AUC grows with sequence length as a power law (Fig. 3)",
}


def config_key(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def variant_key(model: dict, features: dict | None = None) -> str:
    """One variant's key: its model config, and its [features] table when it has one (two rows
    with the same model but different features are different arms)."""
    return config_key({**model, "features": features} if features else model)


def row_key(row: dict) -> str:
    """The key of a table row's variant (`variant_key` of its config and features)."""
    return variant_key(row["config"], row.get("features"))


def _delta(arms: dict, a: dict, b: dict, threshold: float, n_boot: int) -> dict:
    """B − A, paired, with its CI and the verdict of "Δ > threshold"."""
    d = paired_delta(arms[row_key(a)], arms[row_key(b)], n_boot=n_boot)
    return {
        "b": b["variant"],
        "a": a["variant"],
        "diff": d["diff"],
        "ci_low": d["ci_low"],
        "ci_high": d["ci_high"],
        "threshold": threshold,
        "verdict": verdict(d["ci_low"], d["ci_high"], threshold),
    }


def _ci(d: dict) -> str:
    return f"Δ {d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def _claim(claim: str, paper: str, ours: str, deltas: list[dict], flops_ok: bool = True) -> dict:
    state = combine([d["verdict"] for d in deltas])
    if not flops_ok:
        state, ours = "disagrees", ours + "; not cheaper in FLOPs"
    return {"claim": claim, "paper": paper, "ours": ours, "deltas": deltas, "verdict": state}


def comparison(rows: list[dict], base, arms: dict, n_boot: int = N_BOOT) -> list[dict]:
    """The claims the rows can test, each with its paired deltas and three-state verdict."""
    by = {(r["table"], r["variant"]): r for r in rows}
    checks = []
    t, lo = by.get(("baselines", "transformer")), by.get(("baselines", "longer"))
    if t and lo:
        d = _delta(arms, t, lo, -MATCH_MARGIN, n_boot)
        checks.append(
            _claim(
                "LONGER matches or beats the full transformer at a fraction of its FLOPs",
                f"AUC {PAPER['longer']['auc']} vs {PAPER['transformer']['auc']} (+0.00179) at "
                f"{PAPER['longer']['gflops']} vs {PAPER['transformer']['gflops']} GFLOPs (0.51×)",
                f"AUC {lo['auc']:.4f} vs {t['auc']:.4f}, {_ci(d)} at {lo['gflops']:.4g} vs "
                f"{t['gflops']:.4g} GFLOPs ({lo['gflops'] / t['gflops']:.2f}×)",
                [d],
                flops_ok=lo["gflops"] < t["gflops"],
            )
        )
    others = [r for r in rows if r["table"] == "baselines" and r["variant"] not in ("longer", "transformer")]
    if lo and others:
        ds = sorted((_delta(arms, r, lo, 0.0, n_boot) for r in others), key=lambda d: d["diff"])
        checks.append(
            _claim(
                "LONGER beats the cheaper sequence baselines (sumpool, DIN, HSTU)",
                "LONGER above every baseline in Table 1",
                "; ".join(f"vs {d['a']}: {_ci(d)}" for d in ds),
                ds,
            )
        )
    k0 = base.query_k
    allq = next((r for r in rows if r["table"] == "queries" and r["variant"].startswith("all")), None)
    rec = by.get(("queries", f"k={k0} recent"))
    if allq and rec:
        d = _delta(arms, allq, rec, -MATCH_MARGIN, n_boot)
        checks.append(
            _claim(
                f"k = {k0} recent queries lose little against all {base.max_len} as queries",
                PAPER["queries"].split(";")[0],
                f"AUC {rec['auc']:.4f} vs {allq['auc']:.4f}, {_ci(d)} at {rec['gflops']:.4g} vs "
                f"{allq['gflops']:.4g} GFLOPs",
                [d],
            )
        )
    sel = [by.get(("queries", f"k={k0} {s}")) for s in ("recent", "uniform", "learnable")]
    if all(sel):
        ds = [_delta(arms, sel[1], sel[0], 0.0, n_boot), _delta(arms, sel[2], sel[1], 0.0, n_boot)]
        checks.append(
            _claim(
                "query selection: recent > uniform > learnable",
                "recent > uniform > learnable",
                "; ".join(f"{d['b'].split()[1]} − {d['a'].split()[1]}: {_ci(d)}" for d in ds),
                ds,
            )
        )
    merge = {r["variant"]: r for r in rows if r["table"] == "merge"}
    if "K=1 (no merge)" in merge and f"K={base.merge_k} {base.merge}" in merge:
        a, b = merge["K=1 (no merge)"], merge[f"K={base.merge_k} {base.merge}"]
        d = _delta(arms, a, b, -MATCH_MARGIN, n_boot)
        checks.append(
            _claim(
                f"token merge (K = {base.merge_k}, {base.merge}) cuts FLOPs at little or no AUC loss",
                "K = 8 with InnerTrans: lower FLOPs, AUC at or above no merge",
                f"AUC {b['auc']:.4f} vs {a['auc']:.4f}, {_ci(d)} at {b['gflops']:.4g} vs {a['gflops']:.4g} GFLOPs",
                [d],
                flops_ok=b["gflops"] < a["gflops"],
            )
        )
    scaling = sorted(
        (r for r in rows if r["table"] == "scaling" and r["arch"] == "longer"), key=lambda r: r["max_len"]
    )
    if len(scaling) >= 2:
        short, long_ = scaling[0], scaling[-1]
        d = _delta(arms, short, long_, 0.0, n_boot)
        checks.append(
            _claim(
                f"LONGER's AUC grows with sequence length (L = {long_['max_len']} vs {short['max_len']})",
                PAPER["scaling"],
                f"AUC {long_['auc']:.4f} vs {short['auc']:.4f}, {_ci(d)}",
                [d],
            )
        )
    return checks

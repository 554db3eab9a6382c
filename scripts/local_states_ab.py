"""The in-process state cache (serving/local_states.py) on and off, in one process (issue 18).

One app over one store and one cached state (bench/serve.py's shape, L 2000), hits through the
app's ASGI callable, rounds alternating LONGER_STATE_CACHE_MB 256 and 0 (the order flipped
each round), so load on a shared machine hits both alike. Prints, as JSON, each side's p50,
the paired per-round differences of the p50s (on - off, ms) and their median ratio on/off.

    .venv/bin/python scripts/local_states_ab.py --candidates 500
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import uuid
from pathlib import Path

import numpy as np

import bench.serve as s
from bench.hit_profile import asgi_latencies
from serving.app import create_app
from serving.local_states import LocalStates
from serving.runtime import ModelRuntime
from serving.settings import Settings


def measure(app, body: bytes, rounds: int, per_round: int) -> dict[str, list[list[float]]]:
    """ms per hit, per side and round (each round's warm-up hit holds the state again)."""
    cache = app.state.service.cache
    sides = {"on": cache.local, "off": LocalStates(0)}
    out: dict[str, list[list[float]]] = {"on": [], "off": []}
    for r in range(rounds):
        for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
            cache.local = sides[name]
            out[name].append(asgi_latencies(app, body, per_round))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=25)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _, bundle, store, _, _, ts = s._setup(Path(tmp), args.length, f"lsab{uuid.uuid4().hex[:6]}")
        rt = ModelRuntime(str(bundle))
        settings = Settings(model=str(bundle), max_candidates=1000, refresh=False)
        app = create_app(settings, runtime=rt, store=store)
        rng = np.random.default_rng(args.candidates)
        items, cats = rng.integers(0, 100_000, args.candidates), rng.integers(0, 500, args.candidates)
        cands = [{"item_id": int(i), "category_id": int(c)} for i, c in zip(items, cats)]
        body = json.dumps({"user_id": s.USER, "candidates": cands, "ts": int(ts)}).encode()
        try:
            ms = measure(app, body, args.rounds, args.per_round)
        finally:
            app.state.service.pool.shutdown(wait=False)
            store.r.delete(*store.r.scan_iter(match=f"{store.prefix}:*"))
    p50 = {side: [statistics.median(r) for r in rounds] for side, rounds in ms.items()}
    registry = app.state.service.metrics.registry
    print(
        json.dumps(
            {
                "L": args.length,
                "candidates": args.candidates,
                **{f"{side}_p50_ms": round(statistics.median(itertools.chain(*ms[side])), 3) for side in ms},
                "paired_round_diff_ms": sorted(round(a - b, 2) for a, b in zip(p50["on"], p50["off"])),
                "on_over_off_p50_x": round(
                    statistics.median(a / b for a, b in zip(p50["on"], p50["off"])), 3
                ),
                "local": {
                    r: registry.get_sample_value("longer_state_local_total", {"result": r})
                    for r in ("hit", "miss")
                },
            }
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# `make demo`: the main job end to end on embedded defaults.
# Synthesize a behaviour log, build point-in-time training data, show what was built, train
# LONGER with TorchRec for a short run, evaluate the exported bundle, then load the online
# store (an embedded Redis), start the server, post an event, score candidates, stop it, and
# replay the last logged day against the bundle and a shorter-trained one (an offline A/B).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-demo}"
LONGER=.venv/bin/longer

echo "== 1/8 synthesize a behaviour log ($OUT/log)"
$LONGER synth --users 400 --items 5000 --events-per-user 600 --seed 0 --out "$OUT/log" --overwrite >/dev/null
echo "== 2/8 build training data ($OUT/data)"
$LONGER build --log "$OUT/log" --out "$OUT/data" --max-len 256 --test-days 3 --overwrite >/dev/null
echo "== 3/8 what was built"
.venv/bin/python -m feature_store.describe "$OUT/data"
echo "== 4/8 train (configs/demo.toml → $OUT/run)"
rm -rf "$OUT/run"
$LONGER train --config configs/demo.toml --data "$OUT/data" --out "$OUT/run" > "$OUT/train-summary.json"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/train-summary.json"))
e = s["eval"]
print(f"trained {s['steps']} steps at {s['train_samples_per_s']:,.0f} samples/s; bundle {s['model_version']}")
print(f"eval: AUC {e['auc']:.4f}  GAUC {e['gauc']:.4f}  LogLoss {e['logloss']:.4f}  calibration {e['calibration']:.3f}  (n={e['n']:,})")
PY
echo "== 5/8 evaluate the exported bundle without any process group"
$LONGER eval --model "$OUT/run/export" --data "$OUT/data" --quiet

echo "== 6/8 load the online store (embedded Redis in $OUT/redis) and start the server"
export LONGER_REDIS_DIR="$PWD/$OUT/redis"
unset REDIS_URL
rm -rf "$LONGER_REDIS_DIR"
$LONGER store load --data "$OUT/data" --quiet >/dev/null
PORT="${DEMO_PORT:-8765}"
$LONGER serve --model "$OUT/run/export" --port "$PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
echo "== 7/8 score, post an event, score again"
.venv/bin/python - "$PORT" "$OUT" <<'PY'
import json, sys, time
import httpx
import pyarrow.parquet as pq

base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):
    try:
        if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
            break
    except httpx.TransportError:
        pass
    time.sleep(0.1)
else:
    sys.exit("server did not become ready")
print("ready:", httpx.get(f"{base}/readyz").json())
user = pq.read_table(f"{sys.argv[2]}/data/sequences", columns=["user_id"]).column("user_id")[0].as_py()
body = {"user_id": user, "candidates": [{"item_id": i, "category_id": i % 50} for i in (11, 42, 314, 2718)]}
show = lambda tag, r: print(f"{tag:<28} {r['user_state']:<6} {[round(s, 4) for s in r['scores']]}")
show("score (cold cache)", httpx.post(f"{base}/v1/score", json=body).json())
show("score again", httpx.post(f"{base}/v1/score", json=body).json())
ev = {"events": [{"user_id": user, "item_id": 42, "category_id": 42, "action": 3, "label": 1,
                  "ts": int(time.time()) - 1, "event_id": "demo-1"}]}
print("post event:", httpx.post(f"{base}/v1/events", json=ev).json())
show("score after the event", httpx.post(f"{base}/v1/score", json=body).json())
print("model:", httpx.get(f"{base}/v1/model").json()["model_version"])
PY
kill "$SERVER"
wait "$SERVER" 2>/dev/null || true
trap - EXIT
echo "== server stopped"

echo "== 8/8 replay the held-back day: a 60-step bundle (A) against the 200-step one (B)"
rm -rf "$OUT/run-short"
$LONGER train --config configs/demo.toml --data "$OUT/data" --out "$OUT/run-short" --quiet \
  train.steps=60 train.eval_every=0 > /dev/null 2>&1
SPLIT=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['split']['split_ts'])" "$OUT/data/meta.json")
$LONGER replay --log "$OUT/log" --bundle A="$OUT/run-short/export" --bundle B="$OUT/run/export" --all-arms \
  --start "$SPLIT" --limit 300 --out "$OUT/replay" --quiet > /dev/null
cat "$OUT/replay/report.md"
echo "== done (report and plots in $OUT/replay/)"

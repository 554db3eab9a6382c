#!/usr/bin/env bash
# `make demo`: the main job end to end on embedded defaults, sized for about 2 minutes on two
# idle CPU cores (install excluded; README "Two commands" has the measured time).
# Synthesize a behaviour log, build point-in-time training data, show what was built, train
# LONGER with TorchRec, evaluate the exported bundle beside simple yardsticks, then load the
# online store (an embedded Redis), start the server, score, post an event, score again, stop
# it, and replay the held-back days against the bundle and a shorter-trained one (an offline
# A/B). Every step shows its progress and errors; the end lists what was made and what to try.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-demo}"
LONGER=.venv/bin/longer
PY=.venv/bin/python
STEPS=9
# One torch thread per process unless you say otherwise: on a 2-core machine that is busy with
# anything else, two OpenMP threads that wait on each other made training 3-7× slower in our
# measurements, while one thread keeps its pace (and costs ~1.5× on an idle machine).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

now_ms() { date +%s%3N; }
T_START=$(now_ms)
T_LAST=$T_START
STAGE=""
TIMES=()
lap() {  # close the current stage's timer
  local t
  t=$(now_ms)
  [ -n "$STAGE" ] && TIMES+=("$(printf '  %-12s %6.1f s' "$STAGE" "$(( t - T_LAST ))e-3")")
  T_LAST=$t
}
stage() {  # stage N NAME "what it does": announce the next stage
  lap
  STAGE=$2
  echo "== $1/$STEPS $3"
}

stage 1 synth "synthesize a behaviour log ($OUT/log)"
$LONGER synth --users 400 --items 2000 --events-per-user 600 --seed 0 --out "$OUT/log" --overwrite >/dev/null
stage 2 build "build training data ($OUT/data)"
$LONGER build --log "$OUT/log" --out "$OUT/data" --max-len 128 --test-days 2 --overwrite >/dev/null

stage 3 describe "what was built"
$PY -m feature_store.describe "$OUT/data"

stage 4 train "train LONGER (configs/demo.toml → $OUT/run)"
$LONGER train --config configs/demo.toml --data "$OUT/data" --out "$OUT/run" --overwrite > "$OUT/run-summary.json"
$PY - "$OUT" <<'PY'
import json, sys
from trainer.yardstick import yardsticks

out = sys.argv[1]
s = json.load(open(f"{out}/run-summary.json"))
e, y = s["eval"], yardsticks(f"{out}/data")
print(f"trained {s['steps']} steps at {s['train_samples_per_s']:,.0f} samples/s; bundle {s['model_version']}")
print(f"eval AUC on the held-back days ({e['n']:,} samples), beside what simple scores reach on the same split:")
print(f"  LONGER, this run                     {e['auc']:.4f}   (GAUC {e['gauc']:.4f}, LogLoss {e['logloss']:.4f}, "
      f"calibration {e['calibration']:.3f})")
print(f"  item popularity (train-split count)  {y['item_popularity_auc']:.4f}   (below 0.5: popular items are "
      "clicked less in this log)")
print(f"  item click rate (train split)        {y['item_ctr_auc']:.4f}   (each item's past click rate, no user "
      "signal; short CPU runs stay below it, docs/results.md)")
print(f"  oracle (the log's own p_true)        {y['oracle_auc']:.4f}   (the best any model can do here)")
PY

stage 5 eval "evaluate the exported bundle without any process group"
$LONGER eval --bundle "$OUT/run/export" --data "$OUT/data" --quiet

stage 6 store-load "load the online store (embedded Redis in $OUT/redis) and start the server"
case "$OUT" in /*) export LONGER_REDIS_DIR="$OUT/redis" ;; *) export LONGER_REDIS_DIR="$PWD/$OUT/redis" ;; esac
unset REDIS_URL
rm -rf "$LONGER_REDIS_DIR"
$LONGER store load --data "$OUT/data" --quiet >/dev/null
PORT="${DEMO_PORT:-8765}"
$LONGER serve --bundle "$OUT/run/export" --port "$PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT

stage 7 serve+score "wait for the server, score, post an event, score again"
$PY - "$PORT" "$OUT" "$SERVER" <<'PY'
import json, os, sys, time
import httpx
import pyarrow.parquet as pq

base, server = f"http://127.0.0.1:{sys.argv[1]}", int(sys.argv[3])
for _ in range(1200):
    try:
        if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
            break
    except httpx.TransportError:
        pass
    try:
        os.kill(server, 0)
    except ProcessLookupError:
        sys.exit("longer serve exited (its error is above)")
    time.sleep(0.1)
else:
    sys.exit("longer serve did not become ready in 2 minutes")
print("ready:", httpx.get(f"{base}/readyz").json())
user = pq.read_table(f"{sys.argv[2]}/data/sequences", columns=["user_id"]).column("user_id")[0].as_py()
body = {"user_id": user, "candidates": [{"item_id": i, "category_id": i % 50} for i in (11, 42, 314, 1718)]}
show = lambda tag, r: print(f"{tag:<28} {r['user_state']:<6} {[round(s, 4) for s in r['scores']]}")
show("score (cold cache)", httpx.post(f"{base}/v1/score", json=body).json())
show("score again", httpx.post(f"{base}/v1/score", json=body).json())
ev = {"events": [{"user_id": user, "item_id": 42, "category_id": 42, "action": 3, "label": 1,
                  "ts": int(time.time()) - 1, "event_id": f"demo-{time.time_ns()}"}]}
print("post event:", httpx.post(f"{base}/v1/events", json=ev).json())
show("score after the event", httpx.post(f"{base}/v1/score", json=body).json())
print("model:", httpx.get(f"{base}/v1/model").json()["model_version"])
PY
kill "$SERVER"   # SIGTERM, as docker and Kubernetes stop it: graceful, and the embedded Redis stops too
wait "$SERVER" || { echo "demo: longer serve exited with an error" >&2; exit 1; }
trap - EXIT
echo "server stopped"

stage 8 train-short "train a shorter run for the A/B ($OUT/run-short: 40 steps)"
$LONGER train --config configs/demo.toml --data "$OUT/data" --out "$OUT/run-short" --overwrite \
  train.steps=40 > "$OUT/run-short-summary.json"

stage 9 replay "replay the held-back days: the 40-step bundle (A) against the full one (B)"
SPLIT=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['split']['split_ts'])" "$OUT/data/meta.json")
$LONGER replay --log "$OUT/log" --bundle A="$OUT/run-short/export" --bundle B="$OUT/run/export" --all-arms \
  --start "$SPLIT" --limit 400 --out "$OUT/replay" --overwrite > "$OUT/replay-summary.json"
cat "$OUT/replay/report.md"

lap
T_END=$T_LAST
cat <<EOF

== done in $(( (T_END - T_START) / 1000 )) s. Time per step:
$(printf '%s\n' "${TIMES[@]}")

What it made:
  $OUT/log/              the synthetic behaviour log (parquet; p_true is each row's true click probability)
  $OUT/data/             the point-in-time dataset: sequences/, train/, eval/, meta.json
  $OUT/run/              the training run: metrics.jsonl, predictions.parquet, tb/, checkpoints/, plan.txt
  $OUT/run/export/       the serving bundle: model.safetensors, config.json, feature_schema.json
  $OUT/run-short/        the 40-step run (arm A of the replay)
  $OUT/redis/store.rdb   the embedded Redis's data: every user's recent events
  $OUT/replay/           the A/B report: report.md, report.json, latency_cdf.png, calibration.png, deltas.png

Next, try:
  LONGER_REDIS_DIR=$OUT/redis $LONGER serve --bundle $OUT/run/export   # then open http://127.0.0.1:8000/docs
  $LONGER eval --bundle $OUT/run/export --data $OUT/data --predictions preds.parquet
  $LONGER train --config configs/demo.toml --data $OUT/data --out $OUT/run --overwrite train.steps=1000
  .venv/bin/tensorboard --logdir $OUT/run/tb
EOF

#!/usr/bin/env bash
# Issue 19's length study on the long-range synthetic log (`longer synth --long-range`, 10
# impressions per request so request-level batching applies): the scaling table (LONGER's AUC
# against max_len, 2 seeds, power-law fit) and length extrapolation (a bundle trained at 256
# evaluated at 256 … the longest, beside the scaling runs trained at those lengths).
#   scripts/length_study.sh [OUT] [extra `longer bench quality` flags]
# Every run trains with the config's [train] budget (configs/quality.toml: early stopping on a
# validation split, at most train.steps), batches of 16 requests (~160 samples).
# Sizes (environment): SCALE=cpu (default: 400 users × ~2,000 events, L 64…2048) or SCALE=gpu
# (the paper's scale: 20,000 users × ~10,000 events, L 256…8192, d 64, at most 20,000 steps;
# training runs on the GPU when one is visible; pass --device cuda for the throughput columns):
#   SCALE=gpu scripts/length_study.sh bench-out/length-gpu --device cuda
# Override any size with USERS, EVENTS, LENGTHS, STEPS, SEEDS, EXTRAPOLATE_FROM, and the compared
# archs with ARCHS (default longer,transformer,din,din_recent50: the transformer up to L 1,024).
# LONGER runs without token merge (MERGE_K=1): on this log an 8-way merge projected back to
# d_model (4 dims per event at d 32) loses the per-event categories the far signal lives in —
# L 256: AUC 0.635 with K 8, 0.677 with K 1 (docs/results.md, "Length scaling"). Without merge
# a step costs ~1.2× (the first layer's keys and values over L tokens; queries stay k).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench-out/length}"
shift || true
LONGER=.venv/bin/longer
if [ "${SCALE:-cpu}" = gpu ]; then
  USERS="${USERS:-20000}" EVENTS="${EVENTS:-10000}" LENGTHS="${LENGTHS:-256,512,1024,2048,4096,8192}"
  MODEL="model.d_model=64 model.emb_dim=32 train.batch_size=16 train.steps=${STEPS:-20000}"
  MODEL="$MODEL model.merge_k=${MERGE_K:-1}"
else
  USERS="${USERS:-400}" EVENTS="${EVENTS:-2000}" LENGTHS="${LENGTHS:-64,128,256,512,1024,2048}"
  MODEL="train.batch_size=16${STEPS:+ train.steps=$STEPS} model.merge_k=${MERGE_K:-1}"  # 16 requests = ~160 samples
fi
SEEDS="${SEEDS:-2}" FROM="${EXTRAPOLATE_FROM:-256}" CFG="${QUALITY_CONFIG:-configs/quality.toml}"
LONGEST="${LENGTHS##*,}"
mkdir -p "$OUT"

if [ ! -f "$OUT/data/meta.json" ]; then
  echo "== long-range log: $USERS users × ~$EVENTS events, 10 impressions per request"
  $LONGER synth --users "$USERS" --items 20000 --events-per-user "$EVENTS" --long-range \
    --impressions-per-request 10 --seed 0 --out "$OUT/log" --overwrite --quiet >/dev/null
  $LONGER build --log "$OUT/log" --out "$OUT/data" --max-len "$LONGEST" --test-days 4 --overwrite --quiet >/dev/null
fi

ARCHS="${ARCHS:-longer,transformer,din,din_recent50}"
echo "== scaling: $ARCHS at L = $LENGTHS, $SEEDS seeds ($MODEL)"
# shellcheck disable=SC2086  # MODEL is a list of overrides
$LONGER bench quality --data "$OUT/data" --config "$CFG" --out "$OUT/scaling" --tables scaling \
  --scaling-archs "$ARCHS" --lengths "$LENGTHS" --seeds "$SEEDS" "$@" model.max_len="$FROM" $MODEL >/dev/null
echo "   → $OUT/scaling/results.md"

echo "== extrapolation: trained at L = $FROM, evaluated at $FROM … $LONGEST"
# shellcheck disable=SC2086
[ -f "$OUT/extrapolate-$FROM/export/config.json" ] ||
  $LONGER train --config "$CFG" --data "$OUT/data" --out "$OUT/extrapolate-$FROM" --quiet --overwrite \
    model.max_len="$FROM" $MODEL >/dev/null
: > "$OUT/extrapolation.jsonl.tmp"
for L in ${LENGTHS//,/ }; do
  [ "$L" -ge "$FROM" ] || continue
  $LONGER eval --bundle "$OUT/extrapolate-$FROM/export" --data "$OUT/data" --max-len "$L" --quiet |
    python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'trained_at': $FROM, **{k: r[k] for k in ('max_len', 'auc', 'gauc', 'logloss')}}))" \
    >> "$OUT/extrapolation.jsonl.tmp"
done
mv "$OUT/extrapolation.jsonl.tmp" "$OUT/extrapolation.jsonl"
cat "$OUT/extrapolation.jsonl"
echo "   → $OUT/extrapolation.jsonl (trained at each L: the scaling rows in $OUT/scaling/results.md)"

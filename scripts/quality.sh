#!/usr/bin/env bash
# `make bench-quality` (QUICK=1: `make bench-quality-quick`): the paper's tables on public data.
# Builds the datasets once (MovieLens ml-latest-small from ../shared/data or $MOVIELENS, ml-100k
# from ../shared/data or $ML100K, a synthetic long-sequence log, and a synthetic log in Taobao
# UserBehavior's shape run through `longer import taobao`), then runs `longer bench quality` on each. Reruns reuse
# finished training runs (each output directory keeps a journal, runs.jsonl).
#   scripts/quality.sh [OUT] [--quick] [extra `longer bench quality` flags, e.g. --seeds 3]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench-out/quality}"
shift || true
LONGER=.venv/bin/longer
ML="${MOVIELENS:-../shared/data/ml-latest-small}"
ML100K="${ML100K:-../shared/data/ml-100k}"

if [ ! -f "$OUT/data/ml-latest-small/meta.json" ]; then
  echo "== building ml-latest-small (last 365 days = eval)"
  $LONGER import movielens "$ML" --out "$OUT/logs/ml-latest-small" --overwrite --quiet >/dev/null
  $LONGER build --log "$OUT/logs/ml-latest-small" --out "$OUT/data/ml-latest-small" --max-len 2048 \
    --test-days 365 --overwrite --quiet >/dev/null
fi
if [ ! -f "$OUT/data/synth-long/meta.json" ]; then
  echo "== building synth-long (200 users × ~1,000 events, last 2 days = eval)"
  $LONGER synth --users 200 --items 3000 --events-per-user 1000 --seed 7 --out "$OUT/logs/synth-long" \
    --overwrite --quiet >/dev/null
  $LONGER build --log "$OUT/logs/synth-long" --out "$OUT/data/synth-long" --max-len 1024 --test-days 2 \
    --overwrite --quiet >/dev/null
fi
if [ ! -f "$OUT/data/ml-100k/meta.json" ] && [ -d "$ML100K" ]; then
  echo "== building ml-100k (last 30 days = eval)"
  $LONGER import movielens "$ML100K" --out "$OUT/logs/ml-100k" --overwrite --quiet >/dev/null
  $LONGER build --log "$OUT/logs/ml-100k" --out "$OUT/data/ml-100k" --max-len 1024 \
    --test-days 30 --overwrite --quiet >/dev/null
fi
if [ ! -f "$OUT/data/synth-taobao/meta.json" ]; then
  echo "== building synth-taobao (1,000 users × ~100 events, Taobao UserBehavior shape, last day = eval)"
  $LONGER synth --format taobao --users 1000 --items 400000 --events-per-user 100 --seed 7 \
    --out "$OUT/logs/synth-taobao-csv" --overwrite --quiet >/dev/null
  $LONGER import taobao "$OUT/logs/synth-taobao-csv" --out "$OUT/logs/synth-taobao" --overwrite --quiet >/dev/null
  $LONGER build --log "$OUT/logs/synth-taobao" --out "$OUT/data/synth-taobao" --max-len 256 --test-days 1 \
    --overwrite --quiet >/dev/null
fi
if [[ " $* " == *" --quick "* ]]; then
  sets="ml-latest-small"
else
  sets="ml-latest-small synth-long"
  [ -f "$OUT/data/ml-100k/meta.json" ] && sets="$sets ml-100k"
  sets="$sets synth-taobao"
fi
for s in $sets; do
  name="$s"; cfg="${QUALITY_CONFIG:-configs/quality.toml}"
  suffix=""; [[ " $* " == *" --quick "* ]] && suffix="-quick"
  echo "== longer bench quality: $name ($cfg)"
  $LONGER bench quality --data "$OUT/data/$name" --config "$cfg" --out "$OUT/$name$suffix" "$@" > /dev/null
  echo "   → $OUT/$name$suffix/results.md"
done

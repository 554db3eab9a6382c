#!/usr/bin/env bash
# `make demo`: the main job end to end on embedded defaults.
# For now: synthesize a behaviour log, build point-in-time training data, and show what was
# built (dataset summary and one TorchRec batch). Later stages (train, serve, score) join here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-demo}"
LONGER=.venv/bin/longer

echo "== 1/3 synthesize a behaviour log ($OUT/log)"
$LONGER synth --users 300 --items 5000 --events-per-user 1500 --seed 0 --out "$OUT/log" --overwrite >/dev/null
echo "== 2/3 build training data ($OUT/data)"
$LONGER build --log "$OUT/log" --out "$OUT/data" --max-len 1000 --test-days 3 --overwrite >/dev/null
echo "== 3/3 what was built"
.venv/bin/python -m feature_store.describe "$OUT/data" --max-len 1000

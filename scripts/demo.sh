#!/usr/bin/env bash
# `make demo`: the main job end to end on embedded defaults.
# Synthesize a behaviour log, build point-in-time training data, show what was built, train
# LONGER with TorchRec for a short run, and evaluate the exported serving bundle.
# (Serving and replay join here with their issues.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-demo}"
LONGER=.venv/bin/longer

echo "== 1/5 synthesize a behaviour log ($OUT/log)"
$LONGER synth --users 400 --items 5000 --events-per-user 600 --seed 0 --out "$OUT/log" --overwrite >/dev/null
echo "== 2/5 build training data ($OUT/data)"
$LONGER build --log "$OUT/log" --out "$OUT/data" --max-len 256 --test-days 3 --overwrite >/dev/null
echo "== 3/5 what was built"
.venv/bin/python -m feature_store.describe "$OUT/data"
echo "== 4/5 train (configs/demo.toml → $OUT/run)"
rm -rf "$OUT/run"
$LONGER train --config configs/demo.toml --data "$OUT/data" --out "$OUT/run" > "$OUT/train-summary.json"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/train-summary.json"))
e = s["eval"]
print(f"trained {s['steps']} steps at {s['train_samples_per_s']:,.0f} samples/s; bundle {s['model_version']}")
print(f"eval: AUC {e['auc']:.4f}  GAUC {e['gauc']:.4f}  LogLoss {e['logloss']:.4f}  calibration {e['calibration']:.3f}  (n={e['n']:,})")
PY
echo "== 5/5 evaluate the exported bundle without any process group"
$LONGER eval --model "$OUT/run/export" --data "$OUT/data" --quiet

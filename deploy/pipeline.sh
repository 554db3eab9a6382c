#!/bin/sh
# docker-compose's one-shot trainer (and a recipe for any batch runner):
#   behaviour log (synth or import) → split off the last days for replay → build → train
#   (torchrun -m trainer) → publish the export as SHARED/bundles/live → bootstrap Redis.
#
#   deploy/pipeline.sh [--source synth|movielens:DIR|taobao:FILE|log:DIR] [--config FILE]
#                      [--run NAME] [--nproc N] [--max-len L] [--test-days D] [--live-days D]
#                      [--key-prefix P] [--shared DIR] [--no-train] [section.key=value ...]
#
# --no-train: data and store bootstrap only (the k8s prepare Job; the PyTorchJob trains).
# Every step is skipped when its output exists, so `docker compose up` again does not redo
# work or overwrite the live store; a new --run NAME trains and publishes a new model (the
# serving replicas swap it in, see docs/operations.md). Redis is bootstrapped only when it
# holds no key under --key-prefix (default: $LONGER_KEY_PREFIX, else lg: the setting the servers
# read). REDIS_URL is read as by `longer store load`.
set -eu

source=synth
config=configs/demo.toml
run=demo
nproc=1
max_len=256
test_days=3
live_days=1
prefix="${LONGER_KEY_PREFIX:-lg}"
shared=/shared
train=1
while [ $# -gt 0 ]; do
  case "$1" in
    --source) source="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --run) run="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --max-len) max_len="$2"; shift 2 ;;
    --test-days) test_days="$2"; shift 2 ;;
    --live-days) live_days="$2"; shift 2 ;;
    --key-prefix|--prefix) prefix="$2"; shift 2 ;;  # --prefix: the deprecated name
    --shared) shared="$2"; shift 2 ;;
    --no-train) train=0; shift ;;
    --*) echo "pipeline: unknown option $1" >&2; exit 2 ;;
    *) break ;;  # section.key=value overrides for the trainer
  esac
done

step() { echo "== pipeline: $*"; }

if [ ! -d "$shared/log-all" ]; then
  case "$source" in
    synth)
      step "synthesize a behaviour log ($shared/log-all)"
      longer synth --users 400 --items 5000 --events-per-user 600 --seed 0 --out "$shared/log-all" --quiet ;;
    movielens:*|taobao:*)
      step "import ${source%%:*} ${source#*:} ($shared/log-all)"
      longer import "${source%%:*}" "${source#*:}" --out "$shared/log-all" --quiet ;;
    log:*)
      step "use the behaviour log ${source#log:}"
      mkdir -p "$shared/log-all" && cp -R "${source#log:}"/. "$shared/log-all/" ;;
    *) echo "pipeline: --source must be synth, movielens:DIR, taobao:FILE or log:DIR, got '$source'" >&2; exit 2 ;;
  esac
fi

if [ ! -f "$shared/split.json" ]; then
  step "split off the last $live_days day(s) for replay ($shared/log, $shared/log-live, $shared/split.json)"
  python deploy/split_log.py --log "$shared/log-all" --days "$live_days" --past "$shared/log" --live "$shared/log-live" \
    > "$shared/.split.json"
  mv "$shared/.split.json" "$shared/split.json"
fi

if [ ! -f "$shared/data/meta.json" ]; then
  step "build training data ($shared/data)"
  longer build --log "$shared/log" --out "$shared/data" --max-len "$max_len" --test-days "$test_days" --overwrite --quiet >/dev/null
fi

out="$shared/runs/$run"
if [ "$train" = 1 ] && [ ! -f "$out/export/config.json" ]; then
  step "train $config on $nproc process(es) ($out; resumes from its latest checkpoint if it has one)"
  torchrun --standalone --nproc_per_node "$nproc" -m trainer --config "$config" --data "$shared/data" --out "$out" \
    --quiet --auto-resume "$@"
fi

if [ "$train" = 1 ]; then
  step "publish $out/export as $shared/bundles/live"
  deploy/publish-bundle.sh "$out/export" "$shared/bundles"
fi

if python - "$prefix" <<'PY'
import sys
from feature_store.online import connect
r = connect()  # REDIS_URL, as `longer store load` reads it
sys.exit(0 if next(r.scan_iter(match=f"{sys.argv[1]}:*", count=1000), None) is None else 1)
PY
then
  step "bootstrap the online store from $shared/data (prefix $prefix)"
  longer store load --data "$shared/data" --key-prefix "$prefix" --quiet
else
  step "online store already holds sequences under '$prefix:': not reloaded"
fi
step "done"

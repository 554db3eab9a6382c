#!/bin/sh
# Image entrypoint.
#   serve ARGS...        wait until the bundle at --bundle / $LONGER_BUNDLE exists (--model and
#                        $LONGER_MODEL: the older names, still read), then
#                        exec `longer serve ARGS...` (compose and k8s pass --host 0.0.0.0 --port 8000)
#   <longer subcommand>  exec `longer <subcommand> ...` (synth, import, build, train, eval, store, replay, bench)
#   anything else        exec it as is (torchrun ..., sh -c ..., deploy/*.sh, python ...)
set -eu

case "${1:-}" in
  serve)
    shift
    model="${LONGER_BUNDLE:-${LONGER_MODEL:-}}"
    prev=""
    for arg in "$@"; do  # --bundle PATH / --bundle=PATH override LONGER_BUNDLE, as in `longer serve`
      case "$prev" in --bundle|--model) model="$arg" ;; esac
      case "$arg" in --bundle=*|--model=*) model="${arg#*=}" ;; esac
      prev="$arg"
    done
    if [ -z "$model" ]; then
      echo "entrypoint: serve needs --bundle or LONGER_BUNDLE (a bundle directory)" >&2
      exit 2
    fi
    waited=0
    until [ -f "$model/config.json" ] && [ -f "$model/model.safetensors" ]; do
      [ $((waited % 30)) -eq 0 ] && echo "entrypoint: waiting for a model bundle at $model (${waited}s)"
      sleep 2
      waited=$((waited + 2))
    done
    exec longer serve "$@"
    ;;
  synth|import|build|train|eval|store|replay|bench)
    exec longer "$@"
    ;;
  "")
    exec longer --help
    ;;
  *)
    exec "$@"
    ;;
esac

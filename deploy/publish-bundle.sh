#!/bin/sh
# Publish a training run's export as the live serving bundle.
#
#   deploy/publish-bundle.sh [--newer-than FILE] [--wait SECONDS] EXPORT_DIR BUNDLES_DIR
#
# Copies EXPORT_DIR (a bundle: config.json, feature_schema.json, model.safetensors) to
# BUNDLES_DIR/<model_version>/ (immutable: an existing version is kept as is), then points the
# symlink BUNDLES_DIR/live at it with an atomic rename. Servers run with
# LONGER_BUNDLE=BUNDLES_DIR/live and pick the new version up through LONGER_WATCH_S or
# POST /v1/admin/reload; older versions stay for a rollback (`ln -sfn` them back the same way).
#
# --newer-than FILE: wait (up to --wait seconds, default 600) until EXPORT_DIR/config.json is
# newer than FILE. Every pod of a multi-node PyTorchJob runs this after torchrun: only the node
# of global rank 0 writes the export, possibly after the other nodes' torchrun returned.
set -eu

newer=""
wait_s=600
while [ $# -gt 0 ]; do
  case "$1" in
    --newer-than) newer="$2"; shift 2 ;;
    --wait) wait_s="$2"; shift 2 ;;
    --) shift; break ;;
    -*) echo "publish-bundle: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -eq 2 ] || { echo "usage: publish-bundle.sh [--newer-than FILE] [--wait S] EXPORT_DIR BUNDLES_DIR" >&2; exit 2; }
export_dir="$1"
bundles="$2"

waited=0
while :; do
  if [ -f "$export_dir/config.json" ] && [ -f "$export_dir/model.safetensors" ]; then
    if [ -z "$newer" ] || [ -n "$(find "$export_dir/config.json" -newer "$newer" 2>/dev/null)" ]; then
      break
    fi
  fi
  if [ "$waited" -ge "$wait_s" ]; then
    echo "publish-bundle: no ${newer:+new }bundle at $export_dir after ${wait_s}s" >&2
    exit 1
  fi
  sleep 2
  waited=$((waited + 2))
done

version=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["model_version"])' "$export_dir/config.json")
case "$version" in ""|*/*|.*) echo "publish-bundle: bad model_version '$version'" >&2; exit 1 ;; esac
mkdir -p "$bundles"
if [ ! -d "$bundles/$version" ]; then
  tmp="$bundles/.$version.partial-$$"
  rm -rf "$tmp"
  cp -R "$export_dir" "$tmp"
  # Another pod may have published the same version meanwhile: theirs is identical (content hash).
  mv -T "$tmp" "$bundles/$version" 2>/dev/null || rm -rf "$tmp"
fi
ln -sfn "$version" "$bundles/.live-$$"
mv -T "$bundles/.live-$$" "$bundles/live"
echo "publish-bundle: $bundles/live -> $version"

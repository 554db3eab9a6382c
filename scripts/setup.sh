#!/usr/bin/env bash
# The project's install step (`make setup`): creates .venv/ in the repository root and installs
#   torch 2.13.0 + fbgemm-gpu-cpu 1.8.0 (or, with --cuda / DEVICE=cuda, fbgemm-gpu 1.8.0),
#   torchrec 1.8.0 WITHOUT its declared deps (pip would otherwise pull the CUDA fbgemm-gpu,
#   which overwrites the CPU build and fails at import), torchrec's real deps, and this
#   project in editable mode with its dev extras.
# Idempotent: a stamp holding a hash of this script, pyproject.toml and the device makes a
# second run a no-op (well under a second).
#
# Environment: PYTHON (interpreter, default python3), DEVICE (cpu|cuda), TORCH_INDEX_URL
# (an extra package index for torch wheels, for machines whose default index serves a torch
# build other than the one you want).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${DEVICE:-cpu}"
for arg in "$@"; do
  case "$arg" in
    --cuda) DEVICE=cuda ;;
    --cpu) DEVICE=cpu ;;
    *) echo "setup.sh: unknown argument '$arg' (expected --cpu or --cuda)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cpu|cuda) ;; *) echo "setup.sh: DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;; esac

TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0
# torchrec's runtime requirements other than fbgemm-gpu (installed above per device).
TORCHREC_DEPS=(tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath)

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.setup-stamp"
want=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)-$DEVICE
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "setup: .venv is up to date ($DEVICE)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
extra=()
[ -n "${TORCH_INDEX_URL:-}" ] && extra=(--extra-index-url "$TORCH_INDEX_URL")

echo "setup: torch==$TORCH_VERSION ($DEVICE)"
"${PIP[@]}" "${extra[@]}" "torch==$TORCH_VERSION"
if [ "$DEVICE" = cuda ]; then
  "$VENV/bin/python" -m pip uninstall -y -q fbgemm-gpu-cpu 2>/dev/null || true
  "${PIP[@]}" "fbgemm-gpu==$FBGEMM_VERSION"
else
  "$VENV/bin/python" -m pip uninstall -y -q fbgemm-gpu 2>/dev/null || true
  "${PIP[@]}" "fbgemm-gpu-cpu==$FBGEMM_VERSION"
fi
echo "setup: torchrec==$TORCHREC_VERSION (--no-deps) and its runtime deps"
"${PIP[@]}" --no-deps "torchrec==$TORCHREC_VERSION"
if [ "$DEVICE" = cpu ]; then
  echo "setup: pip may now print 'ERROR: ... torchrec $TORCHREC_VERSION requires fbgemm-gpu, which is not installed': expected and harmless — fbgemm-gpu-cpu provides the same fbgemm_gpu module (the import check at the end proves it)"
fi
"${PIP[@]}" "${TORCHREC_DEPS[@]}" "torch==$TORCH_VERSION"
echo "setup: project (editable, dev extras)"
"${PIP[@]}" -e ".[dev]" "torch==$TORCH_VERSION"
# Fail here, not in the first test, if the stack does not import.
"$VENV/bin/python" - <<'PY'
import torch, fbgemm_gpu, torchrec  # noqa: F401
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: F401
print(f"setup: ok torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else ''}".rstrip())
PY
echo "$want" > "$STAMP"

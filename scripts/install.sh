#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install metareason into it.
#   scripts/install.sh VENV EXTRAS
# torch is installed first, from TORCH_SPEC (default: the CPU-friendly pin torch==2.13.0), and
# only when the environment has no torch yet: a CUDA build that is already there is kept.
# Everything after that installs under a constraint that pins the torch now present, so no
# dependency can replace it, and the extension builds against it (--no-build-isolation).
# Every other package comes at the exact version of the tested lock (LOCK, default
# requirements/lock.txt; LOCK= installs the newest releases within setup.py's ranges instead).
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${2:-}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
LOCK=${LOCK-requirements/lock.txt}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PYTHON" -m venv ${VENV_ARGS:-} "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check "setuptools>=70" wheel "ninja==1.13.2"
# the extension build finds ninja (installed into the venv above) on PATH
export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"

if "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] keeping torch $("$PY" -W ignore -c "import torch; print(torch.__version__)" 2>/dev/null)"
else
  echo "[install] installing $TORCH_SPEC"
  # unquoted on purpose: TORCH_SPEC may carry pip options (--index-url ...)
  "$PY" -m pip install -q --disable-pip-version-check $TORCH_SPEC
fi
constraints="$VENV/torch-constraint.txt"
"$PY" -W ignore -c "import torch; print('torch==' + torch.__version__)" > "$constraints" 2>/dev/null

target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
echo "[install] installing metareason$([ -n "$EXTRAS" ] && echo "[$EXTRAS]") (builds the compiled ops; a minute or two)"
lock_args=()
if [ -n "$LOCK" ]; then
  [ -f "$LOCK" ] || { echo "[install] error: lock file $LOCK not found" >&2; exit 2; }
  lock_args=(-c "$LOCK")
  echo "[install] versions from the lock $LOCK"
fi
"$PY" -m pip install -q --disable-pip-version-check -c "$constraints" "${lock_args[@]}" --no-build-isolation --use-pep517 -e "$target"
"$PY" -c "import metareason, metareason.ops as ops; print('[install] metareason', metareason.__version__, '| op backends:', ', '.join(ops.available_backends()))"

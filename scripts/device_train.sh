#!/usr/bin/env bash
# Train osdiff-tiny (v3's objective; v2 bootstrap for older models) on a lent GPU (device tool), or dry-run the same path on the CPU here:
#   OUT=$(mktemp -d) bash scripts/device_train.sh --device cpu   (~minutes on 2 cores, writes a loadable model)
# The one prerequisite: a Python with osdiff's requirements: .venv/ (`make install` makes it) or
# PYTHON=/path/to/python (else python3, completed from .carry/wheels). Without .carry/data the
# dry run trains on the config's held-out photos (../shared/data/images).
# On the device machine (its own python3 with torch, no registry) the carried folder .carry/ holds
# the wheels (wheels/), the LPIPS backbone (osdiff-cache/) and a training subset (data/train, data/val),
# optionally a model to continue (init-model/); scripts/prepare_device_carry.py makes it. Options: see scripts/device_train.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:?set OUT to the folder that receives the results}"
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import diffusers, compressai, piq" 2>/dev/null; then
  if ! "$PY" -c "import torch" 2>/dev/null || ! compgen -G ".carry/wheels/*.whl" >/dev/null; then
    echo "device_train.sh: $PY lacks torch, diffusers, compressai or piq (and .carry/wheels has no wheels): run make install (.venv/) or set PYTHON" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/wheels/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${OSDIFF_CACHE:-}" ] && [ -d .carry/osdiff-cache ]; then export OSDIFF_CACHE="$PWD/.carry/osdiff-cache"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
exec "$PY" scripts/device_train.py "$@"

#!/usr/bin/env bash
# Train osdiff-tiny v2 on a lent GPU (device tool), or dry-run the same path on the CPU here:
#   OUT=/tmp/x bash scripts/device_train.sh --device cpu        (~minutes on 2 cores, writes a loadable model)
# On the device machine (its own python3 with torch, no registry) the carried folder .carry/ holds
# the wheels (wheels/), a training subset (data/train, data/val) and the TAEF2 pair (taesd/);
# scripts/prepare_device_carry.sh makes it. Options: see scripts/device_train.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:?set OUT to the folder that receives the results}"
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import diffusers, compressai, piq" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/wheels/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
exec "$PY" scripts/device_train.py "$@"

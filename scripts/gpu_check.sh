#!/usr/bin/env bash
# The one-shot GPU check of the performance issue: the GPU tests, then every benchmark at the issue's
# shapes (`kvshift bench gpu`), in about 8 minutes on one H200. Runs from the source tree without
# installing, so it also works on a machine with no network: put wheels of anything missing there
# (e.g. transformers, see README "GPU check") in .whl/ and they are installed into a temporary folder.
# Results: $OUT (or benchmarks/results) gets all-cuda.md, all-cuda.json and gpu-check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvshift-site .whl/*.whl
  export PYTHONPATH=/tmp/kvshift-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
# the GPU tests first (from the checkout), then the benchmarks; the log keeps both
{ "$PY" -m pytest -q -m "slow or not slow" tests/ops tests/models/test_model_triton.py tests/models/test_decode.py -x \
    || echo "GPU tests failed (exit $?)"; "$PY" -m kvshift bench gpu --out "$DEST"; } 2>&1 | tee "$DEST/gpu-check.log"

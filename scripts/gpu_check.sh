#!/usr/bin/env bash
# The GPU check, in parts that each fit a short device slot (<= 5 minutes on one H200, start-up aside):
#   bash scripts/gpu_check.sh tests    the GPU tests (kernels vs the reference, the model on the fused
#                                      kernels, decoding), 60 s per test at most
#   bash scripts/gpu_check.sh op       benchmarks: shift + attention at the issue's shapes, one layer
#   bash scripts/gpu_check.sh train    benchmark: the GPT-2-small-class training step (compiled)
#   bash scripts/gpu_check.sh decode   benchmark: eager and compiled decoding
#   bash scripts/gpu_check.sh          all four, one after another
# Every benchmark adds its rows to $OUT/all-cuda.{md,json} (default benchmarks/results) as soon as it
# finishes, so a part cut off by its slot keeps what it measured; logs go to $OUT/gpu-check-<part>.log.
# Runs from the source tree without installing: on a machine with no network, put wheels of anything
# missing (e.g. transformers, see README "GPU check") in .whl/ and they go into a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
LIMIT=${KVSHIFT_PART_LIMIT:-290}  # seconds per part
mkdir -p "$DEST"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvshift-site .whl/*.whl
  export PYTHONPATH=/tmp/kvshift-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

part() {
  local name=$1; shift
  echo "== gpu check: $name (limit ${LIMIT}s)"
  timeout --signal=INT --kill-after=10 "$LIMIT" "$@" 2>&1 | tee "$DEST/gpu-check-$name.log" || echo "part $name: exit ${PIPESTATUS[0]}"
}

"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
for p in ${1:-tests op train decode}; do
  case "$p" in
    tests) KVSHIFT_TEST_TIMEOUT=60 part tests "$PY" -m pytest -q -m "slow or not slow" tests/ops \
             tests/models/test_model_triton.py tests/models/test_decode.py ;;
    op) part op "$PY" -m kvshift bench gpu-op --out "$DEST" ;;
    train) part train "$PY" -m kvshift bench gpu-train --out "$DEST" ;;
    decode) part decode "$PY" -m kvshift bench gpu-decode --out "$DEST" ;;
    *) echo "usage: bash scripts/gpu_check.sh [tests|op|train|decode]" >&2; exit 2 ;;
  esac
done

#!/usr/bin/env bash
# The GPU check: one command, at most 8 minutes on one GPU (start-up aside), most valuable first.
#   1. probe (<= 3 min, `kvshift bench probe`): the fused kernel past 2^31 elements; one bf16 training step of a
#      tiny model on FlexAttention with packed rows, Triton against the torch backend; prefill + decode under
#      autocast with static and dynamic caches; the compiled static-cache decode with zero CUDA-graph skips;
#      the fused kernel's GB/s against x.clone()
#   2. a trimmed set of GPU tests (<= 2.5 min; the CPU interpreter already covers the full dtype grid)
#   3. benchmark rows (`kvshift bench gpu`: op, layer, training step, decode) in what is left
# Every probe and benchmark row is added to $OUT/all-cuda.{md,json} (default benchmarks/results) as soon as it
# exists, with torch / Triton / transformers / GPU named; logs go to $OUT/gpu-check-<step>.log.
#
#   bash scripts/gpu_check.sh            on the GPU machine, with the image's own packages (torch, triton,
#                                        transformers >= 5.17); wheels in .whl/ are installed only when the
#                                        image lacks transformers
#   bash scripts/gpu_check.sh --dry-run  every step end to end on CPU at tiny shapes (Triton in its interpreter),
#                                        results in a temporary folder; <= 10 minutes on 2 cores (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  DEST=${OUT:-$(mktemp -d /tmp/kvshift-gpu-check.XXXXXX)}
  TOTAL=${KVSHIFT_CHECK_SECONDS:-600}; PROBE=150; TESTS=270
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DRY_FLAG=--dry-run
else
  PY=${PYTHON:-python3}
  DEST=${OUT:-benchmarks/results}
  TOTAL=${KVSHIFT_CHECK_SECONDS:-480}; PROBE=180; TESTS=150
  DRY_FLAG=
fi
mkdir -p "$DEST"
if ! "$PY" -c "import transformers" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kvshift-site .whl/*.whl
  export PYTHONPATH=/tmp/kvshift-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
FAILED=()

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with the smaller of its limit and what is left of TOTAL
  local name=$1 limit=$2; shift 2
  local left=$(( TOTAL - SECONDS ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then echo "== gpu check: $name skipped (no time left)"; FAILED+=("$name (no time)"); return; fi
  echo "== gpu check: $name (limit ${limit}s, ${SECONDS}s elapsed)"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$DEST/gpu-check-$name.log"
  local rc=${PIPESTATUS[0]}
  if (( rc != 0 )); then echo "== gpu check: $name exit $rc"; FAILED+=("$name (exit $rc)"); fi
}

"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')" || exit 1
step probe "$PROBE" "$PY" -m kvshift bench probe $DRY_FLAG --out "$DEST"
R=tests/ops/test_kv_shift_rope_triton.py; S=tests/ops/test_kv_shift_triton.py
KVSHIFT_TEST_TIMEOUT=60 step tests "$TESTS" "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/models/test_gpu_readiness.py tests/models/test_model_triton.py \
  $R::test_bf16_matches_reference $R::test_fp32_no_rope_matches_reference $R::test_kernels_write_every_element \
  $R::test_non_contiguous_x_and_expanded_cos_sin $R::test_deterministic_weight_grad \
  $S::test_bf16_matches_reference $S::test_packed_cu_seqlens_matches_reference $S::test_cuda_bf16_large
step bench "$TOTAL" "$PY" -m kvshift bench gpu $DRY_FLAG --out "$DEST"
echo "== gpu check: ${SECONDS}s; results in $DEST/all-cuda.md"
if (( ${#FAILED[@]} )); then echo "== gpu check FAILED: ${FAILED[*]}"; exit 1; fi
echo "== gpu check passed"

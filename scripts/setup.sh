#!/usr/bin/env bash
# Create .venv and install kvshift (CPU PyTorch unless KVSHIFT_TORCH says otherwise).
#   bash scripts/setup.sh          what the commands need (the main job: kvshift reproduce / train / compare)
#   bash scripts/setup.sh --test   plus the test and optional dependencies (pytest, Triton, lm-eval, datasets)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=""
for arg in "$@"; do
  case "$arg" in
    --test|--dev) EXTRAS="[dev]" ;;
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# Pin a CPU wheel first: an unpinned torch may pull a multi-GB CUDA build. On a GPU machine set
# KVSHIFT_TORCH="torch" (or a CUDA index URL spec) before running this script.
python -m pip install --quiet "${KVSHIFT_TORCH:-torch==2.13.0}"
python -m pip install --quiet -e ".${EXTRAS}"
python -c "import kvshift, torch; print(f'kvshift {kvshift.__version__} with torch {torch.__version__} ready in .venv')"

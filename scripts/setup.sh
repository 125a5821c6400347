#!/usr/bin/env bash
# Create .venv and install kvshift with its test/dev extras (CPU PyTorch unless KVSHIFT_TORCH says otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# Pin a CPU wheel first: an unpinned torch may pull a multi-GB CUDA build. On a GPU machine set
# KVSHIFT_TORCH="torch" (or a CUDA index URL spec) before running this script.
python -m pip install --quiet "${KVSHIFT_TORCH:-torch==2.13.0}"
python -m pip install --quiet -e ".[dev]"
python -c "import kvshift, torch; print(f'kvshift {kvshift.__version__} with torch {torch.__version__} ready in .venv')"

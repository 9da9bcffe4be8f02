#!/usr/bin/env bash
# Creates .venv and installs mtmoe with its dependencies.
# Where there is no GPU, the CPU build of torch is installed first: a bare "torch" requirement
# would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "torch>=2.4"
  else
    pip install -q "torch==2.13.0"   # the CPU build on this project's machines
  fi
fi
pip install -q -e ".[test]"
python -c "import torch, deepspeed, mtmoe; print(f'mtmoe ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | tail -1

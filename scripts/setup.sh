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
    # The CPU build (+cpu): from pip's configured sources where they have it (this project's machines),
    # else from PyTorch's CPU index; PyPI's plain torch==2.13.0 is the CUDA build, the last resort.
    pip install -q "torch==2.13.0+cpu" 2>/dev/null \
      || pip install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || pip install -q "torch==2.13.0"
  fi
fi
pip install -q -e ".[test]"
# NVMe offload (parallel=zero3_nvme) needs libaio's headers for DeepSpeed's async_io op (built on
# first use, ~5-9 min on 2 cores). Optional: without it everything else works and the NVMe tests skip.
if [ ! -f /usr/include/libaio.h ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then APT="apt-get"; elif sudo -n true 2>/dev/null; then APT="sudo -n apt-get"; else APT=""; fi
  if [ -n "$APT" ]; then
    DEBIAN_FRONTEND=noninteractive $APT install -y -qq libaio-dev >/dev/null 2>&1 \
      || { $APT update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive $APT install -y -qq libaio-dev >/dev/null 2>&1; } \
      || echo "note: could not install libaio-dev; NVMe offload (parallel=zero3_nvme) is unavailable"
  else
    echo "note: libaio-dev missing and no root/sudo to install it; NVMe offload (parallel=zero3_nvme) is unavailable"
  fi
fi
python -c "import torch, deepspeed, mtmoe; print(f'mtmoe ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | tail -1

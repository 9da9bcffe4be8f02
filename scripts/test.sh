#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
# DeepSpeed JIT-builds its ops on first use (cold: shm_comm ~30 s, cpu_adam ~45 s, async_io ~4.5 min
# on 2 cores). Start the builds now, in the background, so they overlap the first, single-process
# tests; a test that needs an op before it is ready waits on torch's build lock.
python - > .venv/deepspeed_ops_build.log 2>&1 <<'PY' &
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder  # the builders DeepSpeed itself uses

for builder in (get_accelerator().create_op_builder("ShareMemCommBuilder"), CPUAdamBuilder(), AsyncIOBuilder()):
    if builder is not None and builder.is_compatible(verbose=False):
        builder.load(verbose=False)
PY
python -m pytest -q "$@"

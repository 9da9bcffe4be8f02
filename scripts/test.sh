#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
# DeepSpeed JIT-builds its ops on first use (cold, on 2 cores: cpu_adam ~1.5 min,
# async_io + pin_memory ~4 min; see mtmoe/train/ds_ops.py). Start the builds now, in the background,
# so they overlap the first, single-process tests; a test that needs an op before it is ready waits on
# torch's build lock.
python -m mtmoe.train.ds_ops > .venv/deepspeed_ops_build.log 2>&1 &
# Two pytest workers (pytest-xdist), each test file on one of them, so its module fixtures are built
# once: most tests wait on a subprocess or run one thread, and one worker left a core idle (measured:
# fresh-clone CI 24.0 min serially). `-n 0` runs serially.
python -m pytest -q -n 2 --dist loadfile "$@"

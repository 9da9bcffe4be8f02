#!/usr/bin/env bash
# The GPU checks, as one prepared run for a machine with one CUDA GPU (see DEVELOPERS.md / the
# device tool). Here, once: `bash ../shared/device/prepare.sh py-cpuinfo` (wheels into .device/);
# there: `source .device/env.sh && bash scripts/gpu_checks.sh` with $OUT set by the device tool.
#
#   1. pytest -m gpu: the tests that need CUDA (MoE layer: no host sync, grouped == reference in bf16)
#   2. scripts/bench_vs_hf.py --device cuda --size big      (d1024 6+6, 8 experts, 16k-token batches)
#   3. scripts/bench_vs_hf.py --device cuda --size default  (the main job's model)
# Every step writes under $OUT and the run goes on when one fails; the exit code is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: runs it, logs to $OUT/NAME.log, remembers the first failure
  local name=$1; shift
  echo "== $name: $*"
  local started=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - started)) s; tail:"; tail -n 15 "$OUT/$name.log" | sed 's/^/   /'
  [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
  return 0
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
step pytest_gpu python -m pytest -q -m gpu -rs -p no:cacheprovider
step bench_big python scripts/bench_vs_hf.py --device cuda --size big --threads 1 --train-batches 6 --repeats 3 \
  --decode-sentences 256 --out "$OUT/vs_hf_cuda_big"
step bench_default python scripts/bench_vs_hf.py --device cuda --size default --threads 1 --train-batches 8 \
  --repeats 3 --decode-sentences 256 --out "$OUT/vs_hf_cuda_default"
exit $status

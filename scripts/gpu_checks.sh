#!/usr/bin/env bash
# The GPU checks, as one prepared run for a machine with one CUDA GPU (see DEVELOPERS.md / the
# device tool). Here, once: `bash ../shared/device/prepare.sh py-cpuinfo` (wheels into .device/);
# there: `source .device/env.sh && bash scripts/gpu_checks.sh [STEP...]` with $OUT set by the device tool.
#
#   pytest        pytest -m gpu but the layouts: train (fp32, bf16), resume, export, eval, translate and
#                 offloaded serving on CUDA; the MoE layer without host syncs
#   layouts       the gpu test of every one-GPU layout (ZeRO-1/2, CPU Adam, ZeRO-3 CPU/NVMe; builds ops)
#   main          the main job's recipe on the GPU for MAIN_MINUTES (default 1.5): tokens/s, val BLEU
#   bench_default scripts/bench_vs_hf.py --device cuda --size default  (the main job's model)
#   bench_big     scripts/bench_vs_hf.py --device cuda --size big      (d1024 6+6, 8 experts)
#   scale         scripts/bench_scale.py --device cuda: the largest model per one-GPU layout (GPU only,
#                 ZeRO-2 + CPU Adam, ZeRO-3 on the CPU), the GPU capped at SCALE_GPU_GIB (default 8),
#                 each mode's search cut after SCALE_MODE_MINUTES (default 2; its fit then a lower bound)
# Default steps: pytest main layouts. Every step writes under $OUT, has its own time limit, and the run goes
# on when one fails; the exit code is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
status=0
step() {  # step NAME LIMIT_S COMMAND...: runs it, logs to $OUT/NAME.log, remembers the first failure
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - started)) s; tail:"; tail -n 25 "$OUT/$name.log" | sed 's/^/   /'
  [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
  return 0
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
steps=("$@"); [[ ${#steps[@]} -gt 0 ]] || steps=(pytest main layouts)
for s in "${steps[@]}"; do
  case $s in
    pytest) step pytest_gpu "${PYTEST_LIMIT:-240}" python -m pytest -q -m gpu -rs -p no:cacheprovider --durations=15 \
              --basetemp="$OUT/pytest_tmp" -k "not every_layout" ;;
    layouts) step pytest_layouts "${LAYOUTS_LIMIT:-240}" python -m pytest -q -m gpu -rs -p no:cacheprovider \
               --durations=10 --basetemp="$OUT/layouts_tmp" tests/test_gpu.py -k every_layout ;;
    main) step main_gpu "${MAIN_LIMIT:-200}" python -m mtmoe.train +experiment=main parallel=none train.device=cuda \
            train.max_minutes="${MAIN_MINUTES:-1.5}" train.max_tokens="${MAIN_TOKENS:-4096}" train.save_every=0 \
            train.valid_every=0 train.progress=false hydra.run.dir="$OUT/main_gpu"
          python - "$OUT/main_gpu" <<'PY' || true
import json, statistics, sys
from pathlib import Path
run = Path(sys.argv[1])
records = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
train = [r for r in records if r["kind"] == "train"]
res = json.loads((run / "results.json").read_text())
print(json.dumps({"steps": res["step"], "train_minutes": res["train_minutes"], "target_tokens": res.get("target_tokens"),
                  "median_tok_s": statistics.median(r["tokens_per_s"] for r in train[1:] or train),
                  "valid_loss": res.get("valid_loss"), "valid_bleu": res.get("valid_bleu"),
                  "bleu": {k: v.get("bleu") for k, v in res.get("directions", {}).items()}}, indent=1))
PY
          ;;
    bench_default) step bench_default "${BENCH_LIMIT:-200}" python scripts/bench_vs_hf.py --device cuda --size default \
                     --threads 1 --train-batches 8 --repeats 3 --decode-sentences 256 --out "$OUT/vs_hf_cuda_default" ;;
    bench_big) step bench_big "${BENCH_LIMIT:-200}" python scripts/bench_vs_hf.py --device cuda --size big --threads 1 \
                 --train-batches 6 --repeats 3 --decode-sentences 256 --out "$OUT/vs_hf_cuda_big" ;;
    scale) step scale "${SCALE_LIMIT:-480}" python scripts/bench_scale.py --device cuda --gpu-gib "${SCALE_GPU_GIB:-8}" \
             --modes "${SCALE_MODES:-gpu,zero2_cpu_adam,zero3_cpu}" --mode-minutes "${SCALE_MODE_MINUTES:-2}" \
             --timeout 150 --out "$OUT/scale_cuda" ;;
    *) echo "unknown step $s"; status=2 ;;
  esac
done
find "$OUT" -name checkpoints -type d -prune -exec rm -rf {} + 2>/dev/null
exit $status

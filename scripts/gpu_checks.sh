#!/usr/bin/env bash
# The GPU checks, as prepared runs for a machine with one CUDA GPU (README "On GPUs and on several
# machines"; the device tool). Here, once: `bash ../shared/device/prepare.sh py-cpuinfo typing-extensions` (wheels into .device/;
# pydantic, which DeepSpeed imports, needs typing_extensions >= 4.16); there:
# `source .device/env.sh && bash scripts/gpu_checks.sh [STEP...]` with $OUT set by the device tool.
#
#   prebuild      DeepSpeed's ops the layouts load (cpu_adam, async_io): built once, before steps that run beside
#                 each other would wait on one build lock (a scale trial cut by its timeout reads as "does not fit")
#   pytest        every `gpu` test, on PYTEST_WORKERS (6) pytest-xdist workers: train (fp32, bf16), resume,
#                 export, eval, translate (one worker: they share the trained runs), every one-GPU layout
#                 (ZeRO-1/2, CPU Adam, ZeRO-3 CPU/NVMe; builds ops), offloaded serving on CUDA, the MoE
#                 layer without host syncs. Each test is cut after TEST_TIMEOUT (240) s with its traceback
#                 (pytest-timeout), so a stuck one still leaves the others' results.  (~3 min on an H200)
#   layouts       the layouts' tests alone
#   profile       scripts/train_step_profile.py: the trainer's step in fp32, in bf16, and in bf16 with torch's
#                 own attention kernels (cuDNN's first on an H100/H200) on the GPU (the main job's model,
#                 4k-token batches): ms/step, ops, kernel time, host syncs  (~3 min)
#   main          the main job's training on the GPU, +experiment=$MAIN_PRESET (main_gpu) for MAIN_MINUTES
#                 (5): tokens/s, val loss and greedy val BLEU per direction  (MAIN_MINUTES + ~1.5 min)
#   bench_default scripts/bench_vs_hf.py --device cuda --size default  (the main job's model)
#   bench_big     scripts/bench_vs_hf.py --device cuda --size big      (d1024 6+6, 8 experts)
#   validation    scripts/bench_validation.py --device cuda: validation's greedy decoding, all directions in
#                 shared batches vs one direction at a time (model=base, 64 lines per direction)  (~1-2 min)
#   scale         scripts/bench_scale.py --device cuda: the largest model per one-GPU layout (GPU only,
#                 ZeRO-2 + CPU Adam, ZeRO-3 on the CPU), the GPU capped at SCALE_GPU_GIB (default 8),
#                 each mode's search cut after SCALE_MODE_MINUTES (default 2; its fit then a lower bound)
# The steps' logs are $OUT/<step>.log; their folders end up in $OUT/folders.tgz.
# A step named with a trailing '+' (e.g. `scale+`) starts in the background at once and is waited for at
# the end: for a step whose figures do not depend on speed (scale: memory fits) beside one that is timed
# only loosely (pytest). `wait` waits for the background steps started so far (so a timed step after it runs
# alone). Default steps: pytest profile. Every step writes under $OUT, has its own time limit, and the run
# goes on when one fails; the exit code is the first failure's.
#
# Issue 13's acceptance on a lent machine (15 device minutes in all, a start costs 1-2, each call at most 10,
# and the machine goes back after 30 s idle: make the second call at once):
#   call 1: SCALE_MODE_MINUTES=1 SCALE_LIMIT=360 bash scripts/gpu_checks.sh prebuild scale+ pytest wait  (~5-6 min;
#           the limit ends the background scale search inside the call's 10 minutes)
#   call 2: bash scripts/gpu_checks.sh main                                        (~6.5 min: 5 of training)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
run_step() {  # run_step NAME LIMIT_S COMMAND...: runs it, logs to $OUT/NAME.log, prints its tail; returns its rc
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - started)) s; tail:"; tail -n 30 "$OUT/$name.log" | sed 's/^/   /'
  return $rc
}
pytest_args() {  # the gpu tests' common options; pytest-timeout where installed (the GPU machine has it)
  echo -q -m gpu -rs -p no:cacheprovider -n "${PYTEST_WORKERS:-6}" --dist loadgroup
  python -c 'import pytest_timeout' 2>/dev/null && echo "--timeout=${TEST_TIMEOUT:-240}"
}
one_step() {
  case $1 in
    prebuild) run_step prebuild "${PREBUILD_LIMIT:-420}" python -m mtmoe.train.ds_ops ;;
    pytest) run_step pytest_gpu "${PYTEST_LIMIT:-330}" python -m pytest $(pytest_args) --durations=25 \
              --basetemp="$OUT/pytest_tmp" ;;
    layouts) run_step pytest_layouts "${LAYOUTS_LIMIT:-300}" python -m pytest $(pytest_args) --durations=10 \
               --basetemp="$OUT/layouts_tmp" tests/test_gpu.py -k every_layout ;;
    profile) run_step profile "${PROFILE_LIMIT:-300}" python scripts/train_step_profile.py \
               --variant fp32:train.bf16=false --variant bf16:train.bf16=true \
               --variant bf16_cudnn:train.bf16=true --env bf16_cudnn:MTMOE_CUDNN_ATTENTION=1 --out "$OUT/train_step" ;;
    main) run_step main_gpu "${MAIN_LIMIT:-$(python -c "print(int(${MAIN_MINUTES:-5} * 60 + 150))")}" python -m mtmoe.train \
            +experiment="${MAIN_PRESET:-main_gpu}" train.device=cuda train.max_minutes="${MAIN_MINUTES:-5}" \
            ${MAIN_TOKENS:+train.max_tokens=$MAIN_TOKENS} train.save_every=0 train.valid_every=0 train.progress=false \
            hydra.run.dir="$OUT/main_gpu"
          local rc=$?
          python - "$OUT/main_gpu" <<'PY' | tee "$OUT/main_gpu_summary.json" || true
import json, statistics, sys
from pathlib import Path
run = Path(sys.argv[1])
records = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
train = [r for r in records if r["kind"] == "train"]
res = json.loads((run / "results.json").read_text())
print(json.dumps({"steps": res["step"], "train_minutes": res["train_minutes"], "target_tokens": res.get("target_tokens"),
                  "median_tok_s": statistics.median(r["tokens_per_s"] for r in train[1:] or train),
                  "last_tok_s": train[-1]["tokens_per_s"], "peak_gpu_memory_gib": res.get("peak_gpu_memory_gib"),
                  "valid_loss": res.get("valid_loss"), "valid_bleu": res.get("valid_bleu"),
                  "bleu": {k: v.get("bleu") for k, v in res.get("directions", {}).items()}}, indent=1))
PY
          return $rc ;;
    bench_default) run_step bench_default "${BENCH_LIMIT:-200}" python scripts/bench_vs_hf.py --device cuda \
                     --size default --threads 1 --train-batches 8 --repeats 3 --decode-sentences 256 \
                     --out "$OUT/vs_hf_cuda_default" ;;
    bench_big) run_step bench_big "${BENCH_LIMIT:-200}" python scripts/bench_vs_hf.py --device cuda --size big \
                 --threads 1 --train-batches 6 --repeats 3 --decode-sentences 256 --out "$OUT/vs_hf_cuda_big" ;;
    validation) run_step validation "${VALIDATION_LIMIT:-240}" python scripts/bench_validation.py --device cuda \
                  --set model=base --set data.val_lines=64 --rounds 2 --out "$OUT/validation_cuda" ;;
    scale) run_step scale "${SCALE_LIMIT:-480}" python scripts/bench_scale.py --device cuda --gpu-gib "${SCALE_GPU_GIB:-8}" \
             --modes "${SCALE_MODES:-gpu,zero2_cpu_adam,zero3_cpu}" --mode-minutes "${SCALE_MODE_MINUTES:-2}" \
             --timeout 150 --out "$OUT/scale_cuda" ;;
    *) echo "unknown step $1"; return 2 ;;
  esac
}
{ nvidia-smi; echo; echo "kernel: $(uname -r)"; nproc; free -g; } > "$OUT/machine.txt" 2>&1
steps=("$@"); [[ ${#steps[@]} -gt 0 ]] || steps=(pytest profile)
status=0 background=()
wait_background() {
  for pid in "${background[@]}"; do
    wait "$pid"; rc=$?; [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
  done
  background=()
}
for s in "${steps[@]}"; do
  if [[ $s == wait ]]; then
    wait_background
  elif [[ $s == *+ ]]; then
    one_step "${s%+}" & background+=($!)
  else
    one_step "$s"; rc=$?; [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
  fi
done
wait_background
# What comes back from the device tool is a few files, at most two folders down: the steps' logs stay at
# the top of $OUT and their folders (run dirs, tables, pytest's tmp) go into one archive, without
# checkpoints and files over 2 MB (model weights).
find "$OUT" -name checkpoints -type d -prune -exec rm -rf {} + 2>/dev/null
(cd "$OUT" && find . -mindepth 2 -type f -size +2M -delete
 folders=$(find . -mindepth 1 -maxdepth 1 -type d -printf '%P\n')
 [[ -z $folders ]] || { tar czf folders.tgz $folders && rm -rf $folders; })
exit $status

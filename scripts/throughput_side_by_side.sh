#!/usr/bin/env bash
# Main-job training throughput of two commits, interleaved on this box (A B A B ...), so that the
# box's load moves both alike: each run is the main job's training (`+experiment=main`, 2 DeepSpeed
# ranks x 1 thread) for MINUTES of training, no checkpoints, validation only at the end.
#
#   bash scripts/throughput_side_by_side.sh OLD_COMMIT [NEW_COMMIT=HEAD] [MINUTES=3] [PAIRS=2]
#
# Each commit is checked out in a git worktree under $OUT (default /tmp/mtmoe_throughput) and run
# with this clone's .venv (PYTHONPATH puts the worktree's mtmoe first) and its own op build folder.
# Each invocation's runs go to a folder of their own, $OUT/<date-time>/ (a run dir of an earlier
# invocation would be resumed, finished, and counted again).
# Prints per run: steps, median target tokens/s of the logged windows, steps/s after the first window
# (start-up excluded), and the training loss at a common step (same data => same curve when the
# commits compute the same model). Writes $OUT/<date-time>/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
OLD=${1:?usage: throughput_side_by_side.sh OLD_COMMIT [NEW_COMMIT] [MINUTES] [PAIRS]}
NEW=${2:-HEAD}
MINUTES=${3:-3}
PAIRS=${4:-2}
OUT=${OUT:-/tmp/mtmoe_throughput}
RUNS="$OUT/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUNS"
for c in "$OLD" "$NEW"; do
  sha=$(git rev-parse --short "$c")
  [ -d "$OUT/src-$sha" ] || git worktree add -f --detach -q "$OUT/src-$sha" "$c"
done
run() {  # commit index
  local sha; sha=$(git rev-parse --short "$1")
  (cd "$OUT/src-$sha" && PYTHONPATH="$OUT/src-$sha" TORCH_EXTENSIONS_DIR="$OUT/ops-$sha" \
    deepspeed --no_local_rank --num_gpus 2 --module mtmoe.train +experiment=main hydra.run.dir="$RUNS/run-$sha-$2" \
    train.max_minutes="$MINUTES" train.save_every=-1 train.valid_every=0 train.log_every=25 train.valid_bleu=never \
    > "$RUNS/run-$sha-$2.log" 2>&1) || { echo "run $sha-$2 failed: $RUNS/run-$sha-$2.log"; exit 1; }
  echo "done $sha-$2"
}
for i in $(seq 1 "$PAIRS"); do
  if [ $((i % 2)) = 1 ]; then run "$OLD" "$i"; run "$NEW" "$i"; else run "$NEW" "$i"; run "$OLD" "$i"; fi
done
python - "$RUNS" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
rows = []
for log in sorted(out.glob("run-*/train_log.jsonl")):
    train = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == "train"]
    first, last = train[0], train[-1]
    rows.append({"run": log.parent.name, "steps": last["step"],
                 "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:]),
                 "steps_per_s": round((last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"]), 3),
                 "loss_at_150": next((r["loss"] for r in train if r["step"] == 150), None)})
(out / "summary.json").write_text(json.dumps(rows, indent=1))
print("| run | steps | median tgt tok/s | steps/s | loss @150 |\n|---|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['run']} | {r['steps']} | {r['median_tokens_per_s']:.0f} | {r['steps_per_s']:.3f} | {r['loss_at_150']} |")
PY

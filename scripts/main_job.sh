#!/usr/bin/env bash
# The main job: train the default MoE model on the bundled Multi30k corpus with 2 DeepSpeed ranks
# (~24 min budget), export it (safetensors + JSON; AVERAGE=N exports the mean of its last N
# checkpoints: train with train.snapshots=N), pick the length penalty on val, score it with beam 4 on
# test_2016_flickr (sacrebleu BLEU/chrF per direction, plus routing telemetry), then export an
# expert-pruned, int8-quantized model and score it the same way, side by side with the full one.
# Extra arguments are Hydra overrides for training, e.g. train.max_minutes=5.
# Where CUDA GPUs are, it trains one rank per GPU with the GPU preset (+experiment=main_gpu: a bigger
# model and batches, bf16) and exports, prunes and evaluates on the GPU; otherwise 2 CPU ranks x 1
# thread with +experiment=main. GPUS=0 forces the CPU recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
RUN=${RUN:-runs/main-$(date +%Y%m%d-%H%M%S)}
PRUNE=${PRUNE:-"prune.keep=0.5 quant=int8"}
AVERAGE=${AVERAGE:-1}  # averaging lost BLEU on val after the recipe's lr cooldown (bench/main_job/results.md)
TUNE=${TUNE:-"tune.on=data/multi30k/val tune.lines=200 tune.length_penalties=[0.6,1.0,1.4]"}
DIRECTIONS=[en-de,de-en,en-fr,fr-en,en-cs,cs-en]
TEST=data/multi30k/test_2016_flickr
GPUS=${GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}
if [[ $GPUS -gt 0 ]]; then
  PRESET=main_gpu RANKS=$GPUS DEVICE=cuda WORKERS=1
  echo "main job: $GPUS GPU(s) ($(python -c 'import torch; print(torch.cuda.get_device_name())')), preset +experiment=$PRESET, one rank per GPU"
else
  PRESET=main RANKS=2 DEVICE=cpu WORKERS=2
  echo "main job: CPU ($(nproc) cores), preset +experiment=$PRESET, 2 ranks x 1 thread"
fi
started=$(date +%s)

# train.valid_bleu=never: the job scores the export with beam 4 on val (picking the length penalty) and
# on test right after; a greedy val BLEU at the end of training would cost ~30 s for a weaker figure.
deepspeed --no_local_rank --num_gpus "$RANKS" --module mtmoe.train +experiment=$PRESET train.device=$DEVICE \
  train.valid_bleu=never hydra.run.dir="$RUN" "$@"
trained=$(date +%s)
phases=()  # "name seconds" of each step after training
lap() { local now; now=$(date +%s); phases+=("$1=$((now - ${last:-$trained}))"); last=$now; }
# re-running the job rebuilds its exports
mtmoe-export checkpoint="$RUN" out="$RUN/export" overwrite=true average="$AVERAGE" device=$DEVICE
lap export
# shellcheck disable=SC2086
mtmoe-eval model="$RUN/export" test=$TEST directions=$DIRECTIONS beam=4 workers=$WORKERS device=$DEVICE telemetry=true $TUNE \
  out="$RUN/eval_full/test_2016_flickr.json"
lap eval
LP=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["length_penalty"])' \
  "$RUN/eval_full/test_2016_flickr.json")
# shellcheck disable=SC2086
mtmoe-export checkpoint="$RUN/export" out="$RUN/export_pruned" overwrite=true device=$DEVICE $PRUNE
lap prune
mtmoe-eval model="$RUN/export_pruned" test=$TEST directions=$DIRECTIONS beam=4 length_penalty="$LP" workers=$WORKERS \
  device=$DEVICE \
  out="$RUN/eval_pruned/test_2016_flickr.json"
lap eval_pruned
finished=$(date +%s)

python - "$RUN" "$started" "$trained" "$finished" "${phases[*]}" "$PRESET" "$RANKS" "$DEVICE" <<'PY'
import json, sys
from mtmoe.formats.export_format import export_bytes
run, (started, trained, finished), phases = sys.argv[1], map(int, sys.argv[2:5]), sys.argv[5]
preset, ranks, device = sys.argv[6:9]
results = json.load(open(f"{run}/results.json"))
full = json.load(open(f"{run}/eval_full/test_2016_flickr.json"))
pruned = json.load(open(f"{run}/eval_pruned/test_2016_flickr.json"))
log = [json.loads(l) for l in open(f"{run}/train_log.jsonl")]
tps = sorted(r["tokens_per_s"] for r in log if r.get("kind") == "train")
sizes = {name: export_bytes(f"{run}/{name}") for name in ("export", "export_pruned")}
config = json.load(open(f"{run}/export_pruned/config.json"))
print(f"\n== main job summary ({run}) ==")
print(f"device: {device}, preset: +experiment={preset}, {ranks} rank(s)")
median = f"{tps[len(tps) // 2]:.0f}" if tps else "n/a (no step logged)"  # a run shorter than train.log_every steps
tokens = f"{results['target_tokens'] / 1e6:.2f} M target tokens" if "target_tokens" in results else "tokens n/a"
print(f"training: {results['step']} steps, {tokens} in {results['train_minutes']} min, median {median} "
      f"target tokens/s ({ranks} ranks); training phase wall {trained - started} s")
val_bleu = (f", greedy BLEU {results['valid_bleu']} chrF {results.get('valid_chrf')}"
            if results.get("valid_bleu") is not None else "")
print(f"trained model, val ({len(results['directions'])} directions): "
      f"loss {results.get('valid_loss')}{val_bleu}")
export = json.load(open(f"{run}/export/config.json"))["source"]
print(f"exported: {' + '.join(export.get('averaged', [export['checkpoint']]))}"
      + (" (weights averaged)" if export.get("averaged") else ""))
if full.get("tuned"):
    t = full["tuned"]
    grid = ", ".join(f"{g['length_penalty']}: {g['bleu']:.2f}" for g in t["grid"])
    print(f"length penalty picked on val ({t['lines']} lines per direction, beam 4, mean BLEU {grid}): "
          f"{full['length_penalty']}")
pruning = config.get("pruning")
pruned_how = f"{pruning['rule']} keep={pruning.get('keep')}" if pruning else "all experts kept"
print(f"\ntest_2016_flickr, beam 4     full export     pruned export ({pruned_how}, "
      f"{config.get('quantization', {}).get('bits', 32)}-bit experts)")
print(f"{'direction':<10} {'BLEU':>7} {'chrF':>7}   {'BLEU':>7} {'chrF':>7}  {'dBLEU':>6}")
for d, f in full["directions"].items():
    p = pruned["directions"][d]
    print(f"{d:<10} {f['bleu']:>7.2f} {f['chrf']:>7.2f}   {p['bleu']:>7.2f} {p['chrf']:>7.2f}  {p['bleu'] - f['bleu']:>+6.2f}")
print(f"{'mean':<10} {full['mean']['bleu']:>7.2f} {full['mean']['chrf']:>7.2f}   "
      f"{pruned['mean']['bleu']:>7.2f} {pruned['mean']['chrf']:>7.2f}  {pruned['mean']['bleu'] - full['mean']['bleu']:>+6.2f}")
scored = ["en-de", "de-en", "en-fr", "fr-en"]
print(f"mean BLEU over en<->de, en<->fr: full {sum(full['directions'][d]['bleu'] for d in scored) / 4:.2f}, "
      f"pruned {sum(pruned['directions'][d]['bleu'] for d in scored) / 4:.2f}")
for name, s in sizes.items():
    print(f"{name}: {s['file_bytes'] / 1e6:.1f} MB (experts {s['expert_bytes'] / 1e6:.1f} MB)")
print(f"decoding ({device}): full {full['sentences_per_s']} sent/s, pruned {pruned['sentences_per_s']} sent/s")
print(f"routing heatmap: {run}/eval_full/test_2016_flickr.telemetry.png")
print(f"total wall time: {finished - started} s (training phase {trained - started} s, then "
      f"{', '.join(p.replace('=', ' ') + ' s' for p in phases.split())}); outputs in {run}/")
PY

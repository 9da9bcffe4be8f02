#!/usr/bin/env bash
# The main job: train the default MoE model on the bundled Multi30k corpus with 2 DeepSpeed ranks
# (~24 min budget), report its validation BLEU, export it (safetensors + JSON), and score the
# export with beam 4 on test_2016_flickr (sacrebleu BLEU/chrF per direction).
# Extra arguments are Hydra overrides for training, e.g. train.max_minutes=5.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
RUN=${RUN:-runs/main-$(date +%Y%m%d-%H%M%S)}
started=$(date +%s)

deepspeed --no_local_rank --num_gpus 2 --module mtmoe.train +experiment=main hydra.run.dir="$RUN" "$@"
trained=$(date +%s)
mtmoe-export checkpoint="$RUN" out="$RUN/export"
mtmoe-eval model="$RUN/export" test=data/multi30k/test_2016_flickr \
  directions=[en-de,de-en,en-fr,fr-en,en-cs,cs-en] beam=4 workers=2 out="$RUN/test_2016_flickr.json"
finished=$(date +%s)

python - "$RUN" "$started" "$trained" "$finished" <<'PY'
import json, sys
run, started, trained, finished = sys.argv[1], *map(int, sys.argv[2:])
results = json.load(open(f"{run}/results.json"))
test = json.load(open(f"{run}/test_2016_flickr.json"))
log = [json.loads(l) for l in open(f"{run}/train_log.jsonl")]
tps = [r["tokens_per_s"] for r in log if r.get("kind") == "train"]
print(f"\n== main job summary ({run}) ==")
print(f"training: {results['step']} steps in {results['train_minutes']} min, "
      f"median {sorted(tps)[len(tps) // 2]:.0f} target tokens/s (2 ranks); wall {trained - started} s")
print(f"trained model, val (greedy, {len(results['directions'])} directions): "
      f"BLEU {results.get('valid_bleu')}  chrF {results.get('valid_chrf')}")
print(f"export, test_2016_flickr (beam 4): mean BLEU {test['mean']['bleu']}  chrF {test['mean']['chrf']}")
scored = ["en-de", "de-en", "en-fr", "fr-en"]
print(f"mean BLEU over en<->de, en<->fr: {sum(test['directions'][d]['bleu'] for d in scored) / 4:.2f}")
print(f"total wall time: {finished - started} s; outputs in {run}/")
PY

"""mtmoe: a DeepSpeed trainer for multitask multilingual Mixture-of-Experts translation models.

The package follows the data flow, each layer importing only from the ones above it here
(tests/test_layering.py holds the import graph to it):
  errors, paths, scoring   leaf modules: the one-line errors, project paths, sacrebleu BLEU/chrF
  config    structured Hydra configs, one validate function per app, the task-parameter schema
  device    the device decision: where an app computes, bf16 there, where collectives' tensors live
  data/     corpus files -> SentencePiece vocabulary -> token ids -> sampled token-budget batches
  model/    the one encoder-decoder model (plain torch): MoE FFNs with the mtmoe router, batched
            beam search (generation), quantized experts, the state-dict key grammar (keys)
  formats/  what is on disk, owned once: the DeepSpeed checkpoint format of a run (+ manifest,
            resharding), the run's model.json, the standalone export format
  train/    the DeepSpeed engine around that model: step loop, checkpoint save/load, logging
  export/   run -> export pipeline: routing statistics, expert pruning, quantization
  serve/    offloaded experts for big models on small memory: store, LRU cache, prefetch
  eval/     an export scored per direction (sacrebleu), as plain model, subset or served
  cli/      thin Hydra entry points (mtmoe-train, mtmoe-eval, mtmoe-export, mtmoe-translate)
"""

import os

# Nothing in mtmoe downloads models or data sets: keep the HF libraries from trying.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

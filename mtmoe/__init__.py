"""mtmoe: a DeepSpeed trainer for multitask multilingual Mixture-of-Experts translation models.

The package follows the data flow:
  data/   corpus files -> SentencePiece vocabulary -> token ids -> sampled token-budget batches
  model/  the one encoder-decoder model (pure torch), MoE FFN layers with the mtmoe router
  train/  the DeepSpeed engine around that model: config, step loop, checkpoints, logging
  eval/   batched beam search and sacrebleu scoring per direction
  export/ standalone safetensors + JSON artifacts that load without DeepSpeed or pickle
  cli/    thin Hydra entry points (mtmoe-train, mtmoe-eval, mtmoe-export, mtmoe-translate)
"""

import os

# Nothing in mtmoe downloads models or data sets: keep the HF libraries from trying.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

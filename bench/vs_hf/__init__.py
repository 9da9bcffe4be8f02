"""mtmoe vs Hugging Face NLLB-MoE (and mtmoe's dense baseline), side by side on one machine.

Entry point: `python scripts/bench_vs_hf.py` (see `bench.vs_hf.suite`). Modules:

- `systems`: the models at identical dimensions from random weights (mtmoe from the project's
  Hydra presets, `NllbMoeForConditionalGeneration` from a matching `NllbMoeConfig`), parameter
  counts by kind, and the HF adapters (capacity per batch, the fixed expert dispatch).
- `training`: one optimizer step per system on the same mtmoe `BatchStream` batches, timed in
  alternating rounds.
- `decoding`: beam search on the same sentence batches with the same output-length rule.
- `memory`: one system's phase in its own process, for its peak resident memory.
- `report`: results.json, results.md and results.png.
"""

"""The export pipeline: training checkpoints -> standalone inference artifacts (safetensors + JSON,
`mtmoe.formats.export_format`), with routing statistics (`routing`), expert pruning (`prune`,
`calibrate`) and per-direction expert subsets (`subset`)."""

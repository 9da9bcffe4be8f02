"""Serving MoE models whose experts do not all fit in fast memory (issue #6).

Only some experts of each MoE layer are resident; the rest live in a slow tier and are loaded on
demand into each layer's LRU cache (its slots drawn from one pool shared by all MoE layers, or its
own: serve.budget), while a prefetch policy loads the next MoE layer's experts
ahead of time. Decoding code does not change: the runtime swaps each `MoEFFN.experts` for a stand-in
that serves experts from the cache, so outputs are identical to the all-resident model.

Reading order (each module has one job):

- `validate`  checks them and turns `serve.experts_per_layer` into a cache size per layer;
- `layout`    one expert's tensors packed into one flat byte buffer (one copy per load);
- `store`     the slow tier: `experts.safetensors`, memory-mapped (pinned CPU RAM for a GPU model);
- `metrics`   hit rate, prefetch hits, bytes moved, stall time, peak resident expert bytes;
- `cache`     the fast tier: slot pools, and one MoE layer's cache on them (LRU eviction, on-demand loads);
- `loader`    prefetch loads, timed by the slow tier's channel (copies made by the compute thread);
- `policies`  none / speculative / pregate / language: who calls `prefetch(layer, experts)` (and
              `hold`: the language-aware policy keeps a direction's experts resident);
- `runtime`   wires it together: `offload(model, ...)` and `load_for_serving(export_dir, serve)`;
- `requests`  requests of mixed directions decoded one direction at a time.

Its options (`serve.*`) are `mtmoe.config.ServeConfig`, checked by `validate`; it reads exports through
`mtmoe.formats.export_format` and needs nothing of export/ or eval/.
"""

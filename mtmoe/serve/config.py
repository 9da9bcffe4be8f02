"""`serve.*`: how an export is served (mtmoe-eval and mtmoe-translate take the same options).

Plain data with no imports from mtmoe (`mtmoe.config` embeds it in EvalAppConfig and
TranslateAppConfig); `mtmoe.serve.validate` checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ServeConfig:
    experts_per_layer: Optional[float] = None
    """Experts of each MoE layer kept in fast memory: a count (>= 1) or a fraction of the layer's
    experts (< 1, rounded up), at least moe.top_k. None (default): every expert resident, the
    plain model, no serving runtime."""
    prefetch: str = "none"
    """How the next MoE layer's experts are loaded ahead of time: `none` (on demand only),
    `speculative` (the next layer's router applied to this layer's input), `pregate` (the plan of a
    model trained with moe.pregate=true), `language` (each layer's cache seeded and held with the
    experts the request's direction uses most, from the export's routing statistics; the router of
    each MoE layer applied one sub-layer ahead for every token; a call's missing experts streamed
    while its others compute)."""
    store_dir: Optional[str] = None
    """Where the expert store `experts.safetensors` is written on first use; default: the export dir."""
    slow_gbps: float = 0.0
    """Simulated slow-tier bandwidth in GB/s for benchmarks (every expert read is stretched to
    bytes / bandwidth); 0 = as fast as the store file reads (often the OS page cache)."""

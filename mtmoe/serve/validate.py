"""Checks `serve.*` and turns `serve.experts_per_layer` into a cache size per MoE layer.

Every error is a ConfigError naming the field, raised before any weight is read."""

from __future__ import annotations

import math
from typing import get_args

from mtmoe.config import PrefetchPolicy, ServeBudget, ServeConfig, check_choice
from mtmoe.errors import ConfigError

POLICIES = get_args(PrefetchPolicy)
"""`serve.prefetch` choices (config.PrefetchPolicy)."""


def check_serve(serve: ServeConfig) -> None:
    """The checks that need no model: known policy, sizes and bandwidth in range."""
    check_choice("serve.prefetch", serve.prefetch, PrefetchPolicy)
    check_choice("serve.budget", serve.budget, ServeBudget)
    x = serve.experts_per_layer
    if x is not None:
        if x <= 0:
            raise ConfigError(f"serve.experts_per_layer={x} must be > 0 (a count >= 1 or a fraction < 1)")
        if x >= 1 and x != int(x):
            raise ConfigError(f"serve.experts_per_layer={x}: a count (a whole number >= 1) or a fraction (< 1)")
    elif serve.prefetch != "none":
        raise ConfigError(f"serve.prefetch={serve.prefetch} needs serve.experts_per_layer: without it every "
                          "expert is resident and there is nothing to prefetch")
    if serve.slow_gbps < 0:
        raise ConfigError(f"serve.slow_gbps={serve.slow_gbps} must be >= 0 (0 = no simulated limit)")


def offloading(serve: ServeConfig | None) -> bool:
    """True when the serving runtime is asked for (otherwise the plain all-resident model runs)."""
    return serve is not None and serve.experts_per_layer is not None


def cache_sizes(serve: ServeConfig, layer_experts: dict[str, int], top_k: int) -> dict[str, int]:
    """Resident experts per MoE layer, e.g. {'enc1': 1, 'dec1': 1} for 0.25 of 4 experts.

    A fraction is of the layer's own experts (pruned layers may keep fewer); a count larger than a
    layer is that whole layer. Fewer than top_k is an error: one token needs its k experts, and a
    cache that cannot hold them reloads experts within every decoding step."""
    check_serve(serve)
    x = serve.experts_per_layer
    sizes = {}
    for layer, n in layer_experts.items():
        size = min(n, math.ceil(round(x * n, 9)) if x < 1 else int(x))  # 0.55 * 100 = 55.00000000000001
        if size < top_k:
            raise ConfigError(f"serve.experts_per_layer={x} keeps {size} of the {n} experts of MoE layer {layer} "
                              f"resident, fewer than moe.top_k={top_k} (each token needs its {top_k} experts)")
        sizes[layer] = size
    return sizes

"""Expert pruning decided from routing telemetry (mtmoe.eval.telemetry).

- global: keep the k most-used experts of every MoE layer (k an int, or a fraction of the experts);
- per direction: keep, per layer, the fewest experts that carry `mass` of that direction's routing.

The result is `{layer: [kept expert ids]}` (sorted). `prune_state_dict` renumbers the kept experts
0..m-1 in the state dict; the gate keeps all its rows (see Router: the pruned router picks only
among kept experts but weighs them with the full softmax, so tokens routed to kept experts are
computed exactly as before).
"""

from __future__ import annotations

import math
import re

import numpy as np

from mtmoe.config import ConfigError
from mtmoe.model.seq2seq import Seq2Seq


def keep_count(keep: float, num_experts: int) -> int:
    """`keep` experts (>= 1) or, when 0 < keep < 1, that fraction of them (rounded up)."""
    if keep <= 0:
        raise ConfigError(f"prune.keep={keep} must be > 0")
    count = math.ceil(keep * num_experts) if keep < 1 else int(keep)
    if count > num_experts:
        raise ConfigError(f"prune.keep={keep} exceeds the {num_experts} experts per layer")
    return max(1, count)


def global_keep(telemetry: dict, keep: float, min_experts: int = 1) -> dict[str, list[int]]:
    """Per layer, the `keep` experts with the largest overall routing share."""
    kept = {}
    for layer in telemetry["layers"]:
        share = np.asarray(telemetry["overall"][layer]["share"])
        count = max(keep_count(keep, len(share)), min_experts)
        kept[layer] = sorted(np.argsort(-share, kind="stable")[:count].tolist())
    return kept


def direction_keep(telemetry: dict, direction: str, mass: float, min_experts: int = 1) -> dict[str, list[int]]:
    """Per layer, the fewest experts whose share of `direction`'s routing reaches `mass`."""
    if direction not in telemetry["by_direction"]:
        raise ConfigError(f"prune.direction={direction!r}: no telemetry for it "
                          f"(have {sorted(telemetry['by_direction'])})")
    if not 0 < mass <= 1:
        raise ConfigError(f"prune.mass={mass} must be in (0, 1]")
    kept = {}
    for layer in telemetry["layers"]:
        share = np.asarray(telemetry["by_direction"][direction][layer]["share"])
        order = np.argsort(-share, kind="stable")
        count = int(np.searchsorted(np.cumsum(share[order]), mass - 1e-9) + 1)
        kept[layer] = sorted(order[:max(count, min_experts)].tolist())
    return kept


def prune_state_dict(state: dict, kept: dict[str, list[int]]) -> dict:
    """Drops the experts not kept and renumbers the kept ones 0..m-1 per layer."""
    out = {}
    prefixes = {Seq2Seq.moe_layer_prefix(layer): ids for layer, ids in kept.items()}
    for key, value in state.items():
        for prefix, ids in prefixes.items():
            m = re.match(re.escape(prefix) + r"experts\.(\d+)\.(.*)", key)
            if m:
                expert = int(m.group(1))
                if expert in ids:
                    out[f"{prefix}experts.{ids.index(expert)}.{m.group(2)}"] = value
                break
        else:
            out[key] = value
    return out

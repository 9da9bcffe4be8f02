"""Expert pruning decided from routing telemetry (mtmoe.export.routing).

- coverage: keep k experts per MoE layer (k an int, or a fraction of
  the experts) chosen so that every language keeps as much of its routing as possible: encoder
  layers by source language, decoder layers by target language (telemetry's `by_language`);
- global: keep the k most-used experts of every MoE layer, by overall share;
- loss (the default `prune.rule`): keep the k experts whose removal raises the calibration loss least
  (mtmoe.export.calibrate);
- per direction: keep, per layer, the fewest experts that carry `mass` of that direction's routing.

Why coverage: multilingual MoE layers specialise by language (a decoder layer routes by target
language), so the experts with the largest overall share can be the ones that several languages
share while a language whose traffic sits on one other expert loses nearly all of it. The coverage
rule maximises the smallest covered share over the languages, then the second smallest, and so on
(leximin), ties by overall share.

The result is `{layer: [kept expert ids]}` (sorted). `prune_state_dict` renumbers the kept experts
0..m-1 in the state dict; the gate keeps all its rows (see Router: the pruned router picks only
among kept experts but weighs them with the full softmax, so tokens routed to kept experts are
computed exactly as before).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from mtmoe.errors import ConfigError
from mtmoe.model.keys import pruned_name


def keep_count(keep: float, num_experts: int) -> int:
    """`keep` experts (>= 1) or, when 0 < keep < 1, that fraction of them (rounded up). The product
    is rounded to 9 places first: 0.28 * 25 is 7.000000000000001 in floating point, which is 7
    experts, not 8."""
    if keep <= 0:
        raise ConfigError(f"prune.keep={keep:g} must be > 0")
    count = math.ceil(round(keep * num_experts, 9)) if keep < 1 else int(keep)
    if count > num_experts:
        raise ConfigError(f"prune.keep={keep:g} exceeds the {num_experts} experts per layer")
    return max(1, count)


def global_keep(telemetry: dict, keep: float, min_experts: int = 1) -> dict[str, list[int]]:
    """Per layer, the `keep` experts with the largest overall routing share."""
    kept = {}
    for layer in telemetry["layers"]:
        share = np.asarray(telemetry["overall"][layer]["share"])
        count = max(keep_count(keep, len(share)), min_experts)
        kept[layer] = sorted(np.argsort(-share, kind="stable")[:count].tolist())
    return kept


EXHAUSTIVE_LIMIT = 200_000
"""Up to this many candidate sets per layer the coverage rule tries them all; beyond it (e.g. 16 of
128 experts) it adds experts greedily."""


def coverage_keep(telemetry: dict, keep: float, min_experts: int = 1) -> dict[str, list[int]]:
    """Per layer, the `keep` experts that leave every language the most of its routing share
    (leximin over the languages routed through the layer, then overall share)."""
    kept = {}
    for layer in telemetry["layers"]:
        overall = np.asarray(telemetry["overall"][layer]["share"])
        shares = np.asarray([stats[layer]["share"] for stats in telemetry["by_language"].values()
                             if layer in stats]).reshape(-1, len(overall))  # [languages, E]
        count = max(keep_count(keep, len(overall)), min_experts)
        kept[layer] = best_cover(shares, overall, count)
    return kept


def best_cover(shares: np.ndarray, overall: np.ndarray, count: int) -> list[int]:
    """The `count` experts maximising the sorted vector of covered shares (shares [L, E], one row
    per language), compared lexicographically from the smallest, ties by overall share [E]; the
    lowest ids among equals. Exhaustive when there are at most EXHAUSTIVE_LIMIT sets, else greedy."""
    num = len(overall)

    def key(ids) -> tuple:
        covered = np.sort(shares[:, list(ids)].sum(axis=1))
        return (*np.round(covered, 6), round(float(overall[list(ids)].sum()), 6))

    if math.comb(num, count) <= EXHAUSTIVE_LIMIT:
        best = max(itertools.combinations(range(num), count), key=key)  # max keeps the first of equals
        return sorted(best)
    # Greedy completion from two starts: nothing, and each language's top expert (greedy alone
    # first adds the experts every language uses a little, and never gets to the ones each uses most).
    tops = list(dict.fromkeys(int(e) for e in np.argmax(shares, axis=1)[np.argsort(-shares.max(axis=1))]))
    candidates = []
    for chosen in ([], tops[:count]):
        chosen = list(chosen)
        while len(chosen) < count:
            chosen.append(max((e for e in range(num) if e not in chosen), key=lambda e: key(chosen + [e])))
        candidates.append(sorted(chosen))
    return max(candidates, key=key)


def coverage(telemetry: dict, kept: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """{layer: {language: share of its routing that goes to kept experts}} (encoder layers by
    source language, decoder layers by target language), for the pruning record in config.json."""
    out = {}
    for layer, ids in kept.items():
        out[layer] = {lang: round(float(np.asarray(stats[layer]["share"])[ids].sum()), 4)
                      for lang, stats in sorted(telemetry["by_language"].items()) if layer in stats}
    return out


SHARE_RULES = {"coverage": coverage_keep, "global": global_keep}
"""The `prune.rule`s (config.PRUNE_RULES) that decide from routing telemetry; `loss` measures
(mtmoe.export.calibrate)."""


def direction_keep(telemetry: dict, direction: str, mass: float, min_experts: int = 1,
                   field: str = "prune") -> dict[str, list[int]]:
    """Per layer, the fewest experts whose share of `direction`'s routing reaches `mass`.
    `field` names the options in errors (`prune.direction`/`prune.mass`, or `subset` at load time)."""
    if not 0 < mass <= 1:
        raise ConfigError(f"{field}.mass={mass} must be in (0, 1]")
    if direction not in telemetry["by_direction"]:
        raise ConfigError(f"{field}: no routing statistics for direction {direction!r} "
                          f"(have {sorted(telemetry['by_direction'])})")
    kept = {}
    for layer in telemetry["layers"]:
        share = np.asarray(telemetry["by_direction"][direction][layer]["share"], dtype=np.float64)
        order = np.argsort(-share, kind="stable")
        # Shares are stored rounded (their sum may be 0.99999): the kept mass is taken of their sum,
        # so mass=1 keeps the experts with traffic, not every expert.
        cumulative = np.cumsum(share[order]) / max(float(share.sum()), 1e-12)
        count = int(np.searchsorted(cumulative, mass - 1e-9) + 1)
        kept[layer] = sorted(order[:max(count, min_experts)].tolist())
    return kept


def prune_state_dict(state: dict, kept: dict[str, list[int]]) -> dict:
    """Drops the experts not kept and renumbers the kept ones 0..m-1 per layer."""
    renamed = ((pruned_name(key, kept), value) for key, value in state.items())
    return {key: value for key, value in renamed if key is not None}

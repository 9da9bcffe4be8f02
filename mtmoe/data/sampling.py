"""Translation directions and temperature sampling over them.

With sizes n_d of the directions, direction d is drawn with p_d ∝ n_d^(1/T) (T=1: proportional to
data, T→∞: uniform), the usual way to up-sample low-resource pairs in multilingual MT.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mtmoe.errors import ConfigError

Direction = tuple[str, str]


def parse_directions(spec: str | Sequence[str], langs: Sequence[str], pivot: str = "en") -> list[Direction]:
    """`all`: every ordered pair of `langs`; `pivot`: to and from `pivot`; else `en-de,de-en`
    (or the list `["en-de", "de-en"]`)."""
    langs = list(langs)
    if not isinstance(spec, str):
        spec = ",".join(spec)
    if spec == "all":
        return [(s, t) for s in langs for t in langs if s != t]
    if spec == "pivot":
        if pivot not in langs:
            raise ConfigError(f"data.pivot={pivot!r} is not one of data.langs={langs}")
        return [d for lang in langs if lang != pivot for d in ((pivot, lang), (lang, pivot))]
    out = []
    for item in spec.split(","):
        parts = item.strip().split("-")
        if len(parts) != 2 or parts[0] == parts[1]:
            raise ConfigError(f"directions: {item!r} is not a direction like 'en-de'")
        for lang in parts:
            if lang not in langs:
                raise ConfigError(f"directions: unknown language {lang!r} in {item!r} (known: {langs})")
        if (parts[0], parts[1]) in out:
            raise ConfigError(f"directions: {item.strip()!r} is listed twice (it would be sampled, and scored, twice)")
        out.append((parts[0], parts[1]))
    if not out:
        raise ConfigError("directions: empty")
    return out


def temperature_probs(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """[num_directions] sampling probabilities p ∝ size^(1/T)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if (sizes <= 0).any():
        raise ValueError("every direction needs at least one example")
    weights = sizes ** (1.0 / temperature)
    return weights / weights.sum()
